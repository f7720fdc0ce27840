"""Broker security, for real: mosquitto with TLS, client certificates, a password file and an ACL.

Certificates are made at test time with the openssl command line: a CA, a server certificate for
127.0.0.1, an expired one, a client certificate, and a second CA the daemon must not trust.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.broker import LocalBroker, find_mosquitto, free_port
from tskit import REPO, Subscriber, absent, tillsight



@pytest.fixture(autouse=True)
def tools():
    if find_mosquitto() is None or shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        absent("mosquitto, mosquitto_passwd and openssl are needed (make test installs them)")
PASSWORD = "correct horse battery staple"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=tillsight test {ca}", cwd=d)
    for name, days in (("server", "2"), ("expired", "-1"), ("client", "2")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", "/CN=localhost" if name != "client" else "/CN=tillsight", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", days, "-extfile", "san.ext", cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwords"), "tillsight", PASSWORD], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(d / "passwords"), "pos", "pos-secret"], check=True)
    for till in ("till-1", "till-2"):  # a till's own POS login, named as its camera (deploy/mosquitto-store.acl)
        subprocess.run(["mosquitto_passwd", "-b", str(d / "passwords"), till, f"{till}-secret"], check=True)
    for name, text in (("mqtt-password", PASSWORD), ("wrong-password", "guess")):
        (d / name).write_text(text + "\n")
        (d / name).chmod(0o600)  # as deploy/README installs it; readable by others is a warning line at start
    return d


def secure_broker(pki: Path, server: str = "server", client_certs: bool = False, acl: str | None = None
                  ) -> LocalBroker:
    """A TLS listener (password file, ACL) for the daemon, and a plain loopback one for the test's POS."""
    broker = LocalBroker()
    broker.pos_port = free_port()
    acl_file = broker.dir / "acl"
    acl_file.write_text(acl or "user tillsight\ntopic readwrite tillsight/store-1/#\n")
    broker.config.write_text(
        # as root, mosquitto would switch to its own user, which cannot read pytest's private folders
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        "per_listener_settings true\npersistence false\nlog_dest stderr\nlog_type error\n"
        f"listener {broker.port} 127.0.0.1\n"
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / (server + '.pem')}\nkeyfile {pki / (server + '.key')}\n"
        f"require_certificate {'true' if client_certs else 'false'}\n"
        f"allow_anonymous false\npassword_file {pki / 'passwords'}\nacl_file {acl_file}\n"
        f"listener {broker.pos_port} 127.0.0.1\nallow_anonymous true\n")
    return broker


def config_file(tmp_path: Path, pki: Path, port: int, age_model: Path, ca: str = "ca", password: str = "mqtt-password",
                client_cert: bool = False, camera: str | None = None) -> Path:
    tls = f'ca_file = "{pki / (ca + ".pem")}"\n'
    if client_cert:
        tls += f'cert_file = "{pki / "client.pem"}"\nkey_file = "{pki / "client.key"}"\n'
    path = tmp_path / "daemon.toml"
    path.write_text(
        f'store_id = "store-1"\ndaemon_id = "till-pc"\n'
        f'[[cameras]]\nid = "till-1"\nsource = "{camera or "/dev/null"}"\nfps_limit = 10\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nusername = "tillsight"\npassword_file = "{pki / password}"\n'
        f'[mqtt.tls]\n{tls}'
        f'[models]\nage_model = "{age_model}"\n[logging]\nlevel = "warning"\n')
    return path


def replay(video: Path, config: Path, ack_timeout: float = 4.0):
    return tillsight("replay", str(video), "--config", str(config), "--ack-timeout", str(ack_timeout))


def one_error_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_tls_with_a_password_and_an_acl_delivers(tmp_path, pki, age_models, hamilton_clip):
    with secure_broker(pki) as broker:
        pos = Subscriber(broker.pos_port, "tillsight/#")
        result = replay(hamilton_clip, config_file(tmp_path, pki, broker.port, age_models[16]))
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert pos.wait_for(lambda s: len(s.json("replay/alert")) == summary["alerts"] > 0, 10)
        pos.close()


def test_client_certificates_are_required_when_the_broker_asks(tmp_path, pki, age_models, hamilton_clip):
    with secure_broker(pki, client_certs=True) as broker:
        with_cert = replay(hamilton_clip, config_file(tmp_path, pki, broker.port, age_models[40], client_cert=True))
        assert with_cert.returncode == 0, with_cert.stderr
        without = one_error_line(replay(hamilton_clip, config_file(tmp_path, pki, broker.port, age_models[40])))
    assert f"MQTT broker at 127.0.0.1:{broker.port}: broker closed the connection: tlsv13 alert certificate required" \
        in without and "messages not acknowledged" in without


@pytest.mark.parametrize("case, expected", [
    ("wrong_ca", "mqtt.tls.ca_file is not the CA that signed the broker's certificate"),
    ("expired", "TLS certificate not accepted: certificate has expired"),
    ("wrong_password", "broker refused the connection: Not authorized (check mqtt.username and mqtt.password_file)"),
])
def test_each_misconfiguration_is_one_clear_line(tmp_path, pki, age_models, hamilton_clip, case, expected):
    with secure_broker(pki, server="expired" if case == "expired" else "server") as broker:
        config = config_file(tmp_path, pki, broker.port, age_models[40], ca="other-ca" if case == "wrong_ca" else "ca",
                             password="wrong-password" if case == "wrong_password" else "mqtt-password")
        line = one_error_line(replay(hamilton_clip, config))
    assert line.startswith("tillsight: error: MQTT broker at 127.0.0.1:") and expected in line, line


def test_a_refused_login_is_logged_as_a_refusal_not_as_unreachable(tmp_path, pki, age_models, caplog):
    """The daemon's log line for a wrong password said "MQTT broker unreachable": the broker answered, and refused."""
    import logging

    from edge.config import load_config
    from edge.publish import Publisher
    with secure_broker(pki) as broker:
        config = load_config(config_file(tmp_path, pki, broker.port, age_models[40], password="wrong-password",
                                         camera=str(age_models[40])))  # any file: no camera is opened here
        publisher = Publisher(config.mqtt, "store-1", "till-pc")
        with caplog.at_level(logging.WARNING, logger="edge.publish"):
            publisher.start()
            deadline = time.monotonic() + 20
            while publisher.connection_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            publisher.client.disconnect()
            publisher.client.loop_stop()
    said = [(r.getMessage(), r.reason) for r in caplog.records if r.name == "edge.publish"]
    assert said == [("MQTT broker refused the connection, retrying",
                     "broker refused the connection: Not authorized (check mqtt.username and mqtt.password_file)")]


def test_a_password_file_that_is_no_text_is_one_line_for_the_daemon_and_the_tools(tmp_path, pki, age_models,
                                                                                   hamilton_clip):
    """Read when the connection is made (it may have changed since the check): bytes that are no UTF-8 text are
    one line from every command that connects, never a traceback."""
    garbled = tmp_path / "garbled-password"
    garbled.write_bytes(b"\xff\xfesecret\n")
    garbled.chmod(0o600)
    config = config_file(tmp_path, tmp_path, 1, age_models[40], camera=str(hamilton_clip))
    text = config.read_text().replace(str(tmp_path / "mqtt-password"), str(garbled))
    config.write_text(text.replace(f'[mqtt.tls]\nca_file = "{tmp_path / "ca.pem"}"\n', ""))
    expected = f"tillsight: error: mqtt.password_file {garbled} is not UTF-8 text"
    for command in (["replay", str(hamilton_clip), "--config", str(config)], ["status", "--config", str(config)],
                    ["pos", "--config", str(config), "check", "--camera", "till-1"]):
        line = one_error_line(tillsight(*command))
        assert line.startswith(expected), (command, line)


def test_a_publish_the_acl_denies_is_counted_and_never_reported_delivered(tmp_path, pki, age_models, hamilton_clip):
    # the daemon may publish estimates and its status, not alerts: the broker answers PUBACK 0x87
    acl = ("user tillsight\ntopic write tillsight/store-1/+/estimate\ntopic readwrite tillsight/store-1/+/status\n"
           "topic write tillsight/store-1/+/analytics\n")
    with secure_broker(pki, acl=acl) as broker:
        pos = Subscriber(broker.pos_port, "tillsight/#")
        line = one_error_line(replay(hamilton_clip, config_file(tmp_path, pki, broker.port, age_models[16])))
        time.sleep(0.5)
        estimates, alerts = len(pos.json("replay/estimate")), len(pos.json("replay/alert"))
        pos.close()
    assert "refused" in line and "not authorised" in line, line
    denied = int(line.split("refused ")[1].split(" ")[0])
    assert denied >= 1 and alerts == 0 and estimates >= 1


def test_a_running_daemon_says_why_the_broker_is_unreachable_once_and_in_its_systemd_status(
        tmp_path, pki, age_models, hamilton_clip):
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    with secure_broker(pki) as broker:
        config = config_file(tmp_path, pki, broker.port, age_models[40], ca="other-ca", camera=str(hamilton_clip))
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        messages = []

        def receive(seconds: float, until=lambda: False) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not until():
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    pass

        try:
            receive(60, lambda: any("certificate not accepted" in m for m in messages))
            receive(6)  # three more retries (every 1-2 s), which must not log again
            daemon.terminate()
            _, err = daemon.communicate(timeout=30)
        finally:
            daemon.kill()
            sock.close()
    assert any(m.startswith("READY=1") or "\nREADY=1" in m or m == "READY=1" for m in messages), messages
    assert any("STATUS=" in m and "mqtt: TLS certificate not accepted" in m for m in messages), messages
    unreachable = [line for line in err.splitlines() if "MQTT broker unreachable" in line]
    assert len(unreachable) == 1 and "not the CA that signed" in unreachable[0], err


def test_the_terminal_tools_use_the_configs_credentials_and_tls(tmp_path, pki, age_models, hamilton_clip):
    with secure_broker(pki) as broker:
        config = config_file(tmp_path, pki, broker.port, age_models[40], camera=str(hamilton_clip))
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline, result = time.monotonic() + 30, None
            while time.monotonic() < deadline and (result is None or result.returncode != 0):
                result = tillsight("status", "--config", str(config), "--wait", "0.5")
            check = tillsight("pos", "--config", str(config), "check", "--camera", "till-1", "--timeout", "10")
            (tmp_path / "other").mkdir()
            wrong = config_file(tmp_path / "other", pki, broker.port, age_models[40], password="wrong-password",
                                camera=str(hamilton_clip))
            refused = tillsight("status", "--config", str(wrong))
            (tmp_path / "wrong-password").write_text("wrong-password\n")
            refused_as = tillsight("status", "--config", str(config), "--username", "pos", "--password-file",
                                   str(tmp_path / "wrong-password"))
        finally:
            daemon.terminate()
            daemon.wait(30)
    assert result.returncode == 0 and result.stdout.split()[:2] == ["till-pc", "online"], result
    assert check.returncode == 0 and json.loads(check.stdout)["camera"] == "till-1", check
    # run's words, naming what to fix: the config's keys, or the options given instead (status said neither)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"tillsight: error: MQTT broker at 127.0.0.1:{broker.port}: broker refused the connection: Not authorized "
        "(check mqtt.username and mqtt.password_file)")
    assert refused_as.returncode == 1 and refused_as.stderr.strip() == (
        f"tillsight: error: MQTT broker at 127.0.0.1:{broker.port}: broker refused the connection: Not authorized "
        "(check --username and --password-file)")


def test_the_shipped_store_acl_lets_daemon_and_pos_talk_and_the_pos_speak_for_no_daemon(tmp_path, pki, age_models,
                                                                                        hamilton_clip):
    from edge.config import MqttConfig
    from edge.pos_terminal import PosError, Terminal
    from edge.publish import mqtt_client
    acl = (REPO / "deploy" / "mosquitto-store.acl").read_text().replace("store-0042", "store-1")
    (tmp_path / "pos-password").write_text("pos-secret\n")
    as_pos = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "username": "pos",
                                        "password_file": str(tmp_path / "pos-password"),
                                        "tls": {"ca_file": str(pki / "ca.pem")}})
    with secure_broker(pki, acl=acl) as broker:
        config = config_file(tmp_path, pki, broker.port, age_models[16], camera=str(hamilton_clip))
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen: dict[str, int] = {}  # messages the POS read, by kind (the topic's last level)

        def count(client, userdata, msg) -> None:
            kind = msg.topic.split("/")[-1]
            seen[kind] = seen.get(kind, 0) + 1

        pos = mqtt_client(as_pos, "pos-reader", protocol="5")
        pos.on_message = count
        pos.connect("127.0.0.1", broker.port)
        pos.subscribe([("tillsight/store-1/+/alert", 1), ("tillsight/store-1/+/estimate", 1),
                       ("tillsight/store-1/+/status", 1)])
        pos.loop_start()
        acks: list[str] = []
        pos.on_publish = lambda c, u, mid, reason, props: acks.append(str(reason))
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not (seen.get("alert") and seen.get("status")):
                time.sleep(0.2)
            terminal = Terminal("127.0.0.1", broker.port, "tillsight/store-1", "t1", mqtt_config=as_pos)
            try:
                answer = terminal.check("till-1", "alcohol", timeout_s=10)
            finally:
                terminal.close()
            for topic in ("tillsight/store-1/till-1/alert", "tillsight/store-1/till-pc-9/status",
                          "tillsight/store-1/till-1/estimate"):
                pos.publish(topic, json.dumps({"schema": 1, "state": "online", "instance": "fake",
                                               "cameras": {"till-1": {}}}), qos=1).wait_for_publish(5)
            time.sleep(1)
            statuses = tillsight("status", "--config", str(config), "--wait", "0.5")
            # the tools with the daemon's config: under this ACL the daemon's user may not ask a check (it was
            # deploy/README's diagnostic); with the POS's user instead, from the command line, it may
            ask = ["pos", "--config", str(config), "check", "--camera", "till-1", "--timeout", "10"]
            as_daemon = tillsight(*ask)
            as_pos_cli = tillsight(*ask[:3], "--username", "pos", "--password-file", str(tmp_path / "pos-password"),
                                   *ask[3:])
            no_user = tillsight("status", "--port", str(broker.pos_port), "--store", "store-1", "--password-file",
                                str(tmp_path / "pos-password"))
        finally:
            pos.loop_stop()
            daemon.terminate()
            daemon.wait(30)
        # the daemon is gone and said offline: only daemon credentials may clear its status, and `tillsight` says
        # a refusal (it used to print a transaction refused by the ACL as sent)
        terminal = Terminal("127.0.0.1", broker.port, "tillsight/store-1", "t2", mqtt_config=as_pos)
        try:
            with pytest.raises(PosError) as refused_forget:
                terminal.forget("till-pc")
        finally:
            terminal.close()
        forgot = tillsight("status", "--config", str(config), "--forget", "till-pc", "--wait", "0.5")
        after = tillsight("status", "--config", str(config), "--wait", "0.5")
    assert str(refused_forget.value) == "the MQTT broker refused tillsight/store-1/till-pc/status: Not authorized"
    assert forgot.returncode == 0, forgot.stderr
    assert after.returncode == 1 and after.stderr.strip() == \
        "tillsight: error: no daemon has published a status under tillsight/store-1/ (is the store id right?)"
    assert seen.get("estimate") and seen.get("alert") and seen.get("status"), seen  # the POS reads what it needs
    assert answer["camera"] == "till-1" and answer["decision"] != "error"  # the daemon read the check, answered
    assert acks == ["Not authorized"] * 3  # no fake alert, status or estimate from a POS
    assert as_daemon.returncode == 1 and as_daemon.stderr.strip() == (
        "tillsight: error: the MQTT broker refused tillsight/store-1/till-1/check: Not authorized"), as_daemon.stderr
    assert as_pos_cli.returncode == 0 and json.loads(as_pos_cli.stdout)["camera"] == "till-1", as_pos_cli.stderr
    assert (no_user.returncode, no_user.stderr.strip()) == (
        2, "tillsight: error: --password-file: password_file is set but username is not")
    # the fake status never reached the daemon: no conflict
    assert statuses.returncode == 0 and statuses.stdout.split()[:2] == ["till-pc", "online"], statuses.stdout


def test_a_tills_own_pos_login_asks_and_reads_for_its_own_till_only(tmp_path, pki, age_models, hamilton_clip):
    """The shipped ACL's per-till logins: the POS of till-2 cannot ask about till-1 (a check or a transaction
    there), nor read till-1's alerts, estimates or answers; till-1's own POS can, from `tillsight pos` too (its
    reply topic under pos/till-1/)."""
    from edge.config import MqttConfig
    from edge.pos_terminal import PosError, Terminal
    from edge.publish import mqtt_client
    acl = (REPO / "deploy" / "mosquitto-store.acl").read_text().replace("store-0042", "store-1")
    logins = {}
    for till in ("till-1", "till-2"):
        (tmp_path / f"{till}-password").write_text(f"{till}-secret\n")
        logins[till] = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "username": till,
                                                  "password_file": str(tmp_path / f"{till}-password"),
                                                  "tls": {"ca_file": str(pki / "ca.pem")}})
    with secure_broker(pki, acl=acl) as broker:
        config = config_file(tmp_path, pki, broker.port, age_models[16], camera=str(hamilton_clip))
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        read: dict[str, list[str]] = {"till-1": [], "till-2": []}  # topics each till's POS was delivered
        readers = []
        for till, login in logins.items():
            reader = mqtt_client(login, f"{till}-reader", protocol="5")
            reader.on_message = lambda c, u, msg, till=till: read[till].append(msg.topic)
            reader.connect("127.0.0.1", broker.port)
            reader.subscribe([("tillsight/store-1/+/alert", 1), ("tillsight/store-1/+/estimate", 1),
                              ("tillsight/store-1/pos/#", 1)])
            reader.loop_start()
            readers.append(reader)
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and "tillsight/store-1/till-1/alert" not in read["till-1"]:
                time.sleep(0.2)
            other = Terminal("127.0.0.1", broker.port, "tillsight/store-1", "lane-2", mqtt_config=logins["till-2"])
            try:
                with pytest.raises(PosError) as refused_check:
                    other.check("till-1", "alcohol", timeout_s=3)
                with pytest.raises(PosError) as refused_transaction:
                    other.transaction("till-1", "start", "T-9")
            finally:
                other.close()
            own = Terminal("127.0.0.1", broker.port, "tillsight/store-1", "lane-1", mqtt_config=logins["till-1"])
            try:
                answer = own.check("till-1", "alcohol", timeout_s=10)
            finally:
                own.close()
            cli = tillsight("pos", "--config", str(config), "--username", "till-1", "--password-file",
                            str(tmp_path / "till-1-password"), "check", "--camera", "till-1", "--timeout", "10")
            time.sleep(0.5)
        finally:
            for reader in readers:
                reader.loop_stop()
            daemon.terminate()
            daemon.wait(30)
    assert str(refused_check.value) == "the MQTT broker refused tillsight/store-1/till-1/check: Not authorized"
    assert "Not authorized" in str(refused_transaction.value)
    assert answer["camera"] == "till-1" and answer["decision"] != "error"
    assert cli.returncode == 0 and json.loads(cli.stdout)["camera"] == "till-1", cli.stderr
    mine = set(read["till-1"])
    assert {"tillsight/store-1/till-1/alert", "tillsight/store-1/till-1/estimate",
            "tillsight/store-1/pos/till-1/lane-1/reply"} <= mine, mine
    assert read["till-2"] == []  # none of till-1's events, nor its answers
