"""The shipped unit under a real systemd: started, reloaded, killed and stopped as a till PC's systemd would.

This machine's PID 1 is not systemd, so the tests boot one in a container over a throw-away overlay of this
machine's own file system (tests/container.py), installed as deploy/README.md says; the daemon in it publishes to
the test's own mosquitto.

Skipped, with the reason, where a container cannot be booted: not root, no systemd-nspawn, no overlayfs, or a
Debian python3 of another minor version than the test's (the environment's compiled modules must fit it); with CI
set, a failure instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import pytest

from container import UNIT, boot_problem, booted, install_config
from test_systemd import exposure
from tskit import REPO, MjpegCamera, tillsight

INSTANCE_DROP_IN = REPO / "deploy" / "tillsight-instance.conf"
GPU_DROP_IN = REPO / "deploy" / "tillsight-gpu.conf"

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    problem = boot_problem()
    if problem and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must boot the container (it runs as root, make installs systemd-container): {problem}")
    if problem:
        pytest.skip(problem)
    with booted(tmp_path_factory.mktemp("container")) as running:
        yield running


def retained_status(subscriber, daemon_id: str) -> list[dict]:
    return [body for body in subscriber.json("/status") if body.get("daemon") == daemon_id]


def test_the_unit_starts_reloads_restarts_after_a_kill_and_stops_under_systemd(machine, broker, subscriber,
                                                                              hamilton_clip):
    install_config(machine, "tillsight", store_id="s1", mqtt={"host": "127.0.0.1", "port": broker.port},
                   cameras=[{"id": "till-1", "source": str(hamilton_clip), "fps_limit": 5}])
    host = machine.run("hostname").stdout.strip()
    machine.run("systemctl", "enable", "--now", "tillsight", timeout=150)  # Type=notify: back at READY=1
    state = machine.wait_until("tillsight", lambda st: "1/1 cameras online" in st["StatusText"], 30)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert "1/1 cameras online" in state["StatusText"], state  # the daemon's STATUS= line
    pid = state["MainPID"]

    # the daemon's own view, over MQTT: online under the host's name, and a customer's age on its way
    assert subscriber.wait_for(lambda s: any(b["state"] == "online" for b in retained_status(s, host)), 30)
    assert subscriber.wait_for(lambda s: s.json("s1/till-1/estimate"), 60), "no estimate from the service"
    # and the POS conversation: an age check, asked the way a till's POS asks it, answered from the sandbox
    asked = tillsight("pos", "--port", str(broker.port), "--store", "s1", "check", "--camera", "till-1",
                      "--item", "alcohol", timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["camera"] == "till-1" and json.loads(asked.stdout)["decision"], asked.stdout

    # the sandbox, as the kernel sees the process
    status = dict(line.split(":\t", 1) for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    uid, gid = machine.uid_gid("tillsight", "video")
    assert status["Uid"].split()[0] == str(uid) and status["Gid"].split()[0] == str(gid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2" and int(status["CapEff"], 16) == 0
    assert machine.run("cat", f"/proc/{pid}/oom_score_adj").stdout.strip() == "500"  # the POS outlives it
    state_dir = machine.root / "var/lib/tillsight"
    assert (state_dir.stat().st_mode & 0o777, state_dir.stat().st_uid) == (0o700, uid)
    assert (state_dir / "outbox.sqlite3").stat().st_uid == uid  # the outbox, in $STATE_DIRECTORY

    # quiet and structured: every line the daemon wrote is JSON (ProcSubset=pid once added two lines of ONNX
    # Runtime's cpuinfo errors, and a slower age model, to every start)
    lines = machine.journal("tillsight", pid)
    assert lines and all(line.startswith("{") and json.loads(line) for line in lines), lines[:5]

    # a bad config: the reload fails and says why; the daemon runs on, as it was
    config = machine.root / "etc/tillsight/tillsight.toml"
    good = config.read_text()
    config.write_text(good.replace("fps_limit = 5", 'fps_limit = "fast"'))
    refused = machine.run("systemctl", "reload", "tillsight", check=False)
    assert refused.returncode != 0
    state = machine.show("tillsight")
    assert (state["ActiveState"], state["MainPID"], state["ReloadResult"]) == ("active", pid, "exit-code"), state
    assert any("fps_limit" in line for line in machine.journal("tillsight")), "the reason is not in the journal"
    # a good config whose model would not load (half copied): the reload's own check loads the models, and fails
    (machine.root / "etc/tillsight/half-copied.onnx").write_bytes(b"the first bytes of a model" * 40)
    config.write_text(good.replace("[models]", '[models]\nage_model = "/etc/tillsight/half-copied.onnx"')
                      if "[models]" in good else good + '\n[models]\nage_model = "/etc/tillsight/half-copied.onnx"\n')
    refused = machine.run("systemctl", "reload", "tillsight", check=False, timeout=120)
    assert refused.returncode != 0
    state = machine.show("tillsight")
    assert (state["ActiveState"], state["MainPID"], state["ReloadResult"]) == ("active", pid, "exit-code"), state
    assert any("half-copied.onnx cannot be loaded" in line for line in machine.journal("tillsight"))

    # a good one: the same process, a new daemon instance in the status
    config.write_text(good)
    before = {b["instance"] for b in retained_status(subscriber, host)}
    machine.run("systemctl", "reload", "tillsight")
    assert subscriber.wait_for(lambda s: any(b["state"] == "online" and b["instance"] not in before
                                             for b in retained_status(s, host)), 60), "not back after the reload"
    state = machine.wait_until("tillsight", lambda st: st["ActiveState"] == "active", 30)
    assert (state["ActiveState"], state["MainPID"]) == ("active", pid), state

    # killed outright: systemd restarts it (Restart=on-failure, RestartSec=5)
    machine.run("systemctl", "kill", "--signal=SIGKILL", "tillsight")
    state = machine.wait_until("tillsight", lambda st: st["NRestarts"] == "1" and st["SubState"] == "running", 60)
    assert state["NRestarts"] == "1" and state["SubState"] == "running" and state["MainPID"] != pid, state

    # a clean stop: the retained status says offline
    machine.run("systemctl", "stop", "tillsight", timeout=60)
    state = machine.show("tillsight")
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
    assert subscriber.wait_for(lambda s: retained_status(s, host)[-1]["state"] == "offline", 10)


def test_a_store_servers_instance_runs_on_its_own_config_and_state_and_feeds_the_watchdog(
        machine, broker, subscriber, carphone_clip):
    """tillsight@NAME with the instance and GPU drop-ins (deploy/README.md, "Installing on a store server"), its
    camera an IP camera (MJPEG over HTTP, as a store server's are); on this machine the GPU drop-in's daemon runs
    on the CPU. The watchdog is shortened to 3 s by a drop-in of the test's own: the daemon must feed it to live,
    and is restarted when it stops (a frozen process here)."""
    units = machine.root / "etc/systemd/system"
    (units / "tillsight@.service").write_text(UNIT.read_text())
    drop_ins = units / "tillsight@.service.d"
    drop_ins.mkdir(exist_ok=True)
    shutil.copy(INSTANCE_DROP_IN, drop_ins / "instance.conf")
    shutil.copy(GPU_DROP_IN, drop_ins / "gpu.conf")
    (drop_ins / "zz-test-watchdog.conf").write_text("[Service]\nWatchdogSec=3\nTimeoutAbortSec=1\n")
    camera = MjpegCamera(carphone_clip, fps=10).start()
    # names, not addresses: resolved inside the sandbox, which has no AF_NETLINK
    install_config(machine, "tills-a", store_id="s1", mqtt={"host": "localhost", "port": broker.port},
                   cameras=[{"id": "till-9", "source": camera.url.replace("127.0.0.1", "localhost")}])
    machine.run("systemctl", "daemon-reload")

    # an instance without its config: the daemon refuses it at start (exit 2), and is not restarted in a loop
    assert machine.run("systemctl", "start", "tillsight@tills-z", check=False, timeout=60).returncode != 0
    time.sleep(6)  # past RestartSec=5
    refused = machine.show("tillsight@tills-z")
    assert (refused["ActiveState"], refused["NRestarts"]) == ("failed", "0"), refused
    # run's last words, a JSON log line under the default [logging] format: the journal's log pipeline reads them
    assert any("/etc/tillsight/tills-z.toml: config file not found" in line and line.startswith("{")
               for line in machine.journal("tillsight@tills-z")), machine.journal("tillsight@tills-z")
    try:
        machine.run("systemctl", "start", "tillsight@tills-a", timeout=150)
        host = machine.run("hostname").stdout.strip()
        assert subscriber.wait_for(lambda s: any(b["state"] == "online"
                                                 for b in retained_status(s, f"{host}-tills-a")), 30)
        uid, _ = machine.uid_gid("tillsight", "video")
        own = machine.root / "var/lib/tillsight/tills-a"
        assert (own / "outbox.sqlite3").stat().st_uid == uid
        state = machine.wait_until("tillsight@tills-a", lambda st: "1/1 cameras online" in st["StatusText"], 30)
        assert "1/1 cameras online" in state["StatusText"], state
        time.sleep(8)  # well past WatchdogSec=3: the daemon fed it every 1.5 s
        fed = machine.show("tillsight@tills-a")
        assert (fed["NRestarts"], fed["MainPID"], fed["SubState"]) == ("0", state["MainPID"], "running"), fed

        machine.run("systemctl", "kill", "--signal=SIGSTOP", "tillsight@tills-a")  # hung: no more WATCHDOG=1
        restarted = machine.wait_until("tillsight@tills-a",
                                       lambda st: st["NRestarts"] == "1" and st["SubState"] == "running", 40)
        assert restarted["NRestarts"] == "1" and restarted["MainPID"] != state["MainPID"], restarted
        assert any("Watchdog timeout" in line for line in machine.journal("tillsight@tills-a"))
    finally:
        machine.run("systemctl", "stop", "tillsight@tills-a", timeout=60)
        camera.stop()


def test_the_sandbox_benchmark_measures_under_the_units_own_sandbox(tmp_path):
    """benchmarks/sandbox.py's measuring unit: the shipped unit less how it is started and supervised, every
    sandbox and resource line kept (the same exposure score), and --set changing one of them."""
    spec = importlib.util.spec_from_file_location("sandbox_bench", REPO / "benchmarks" / "sandbox.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = UNIT.read_text().splitlines()
    unit = bench.measuring_unit([], 1.0).splitlines()
    assert [line for line in shipped if line.split("=", 1)[0] not in bench.NOT_THE_SANDBOX] == \
        [line for line in unit if line.split("=", 1)[0] not in ("Type", "WorkingDirectory", "ExecStart")]
    assert "Type=oneshot" in unit and any(line.endswith("sandbox.py --inner --seconds 1.0") for line in unit)
    changed = bench.measuring_unit(["ProcSubset=pid"], 1.0).splitlines()
    assert "ProcSubset=pid" in changed and "ProcSubset=all" not in changed
    (tmp_path / "shipped.service").write_text(UNIT.read_text())
    (tmp_path / "measuring.service").write_text("\n".join(unit) + "\n")
    assert exposure(tmp_path / "measuring.service")[0] == exposure(tmp_path / "shipped.service")[0]


def test_a_start_that_keeps_failing_ends_failed_after_the_units_start_limit(machine, broker, subscriber,
                                                                            carphone_clip):
    """A corrupt model (exit 1) is retried, then the unit ends failed ("Start request repeated too quickly") for
    monitoring to see, rather than logging the same error every 5 s for ever. A drop-in of the test's own shortens
    RestartSec to 0.2 s, so the unit's own limit (StartLimitBurst=10 in StartLimitIntervalSec=180) comes in seconds."""
    units = machine.root / "etc/systemd/system"
    (units / "tillsight@.service").write_text(UNIT.read_text())
    (units / "tillsight@.service.d").mkdir(exist_ok=True)
    shutil.copy(INSTANCE_DROP_IN, units / "tillsight@.service.d" / "instance.conf")
    own = units / "tillsight@tills-m.service.d"
    own.mkdir(exist_ok=True)
    (own / "zz-test-fast-restart.conf").write_text("[Service]\nRestartSec=200ms\n")
    corrupt = machine.root / "etc/tillsight/corrupt-age.onnx"
    corrupt.write_bytes(b"not an ONNX model, a half-copied file" * 100)
    install_config(machine, "tills-m", store_id="s1", models={"age_model": "/etc/tillsight/corrupt-age.onnx"},
                   mqtt={"host": "127.0.0.1", "port": broker.port},
                   cameras=[{"id": "till-7", "source": str(carphone_clip)}])
    machine.run("systemctl", "daemon-reload")

    machine.run("systemctl", "start", "--no-block", "tillsight@tills-m")
    gave_up = machine.wait_until("tillsight@tills-m", lambda st: st["ActiveState"] == "failed", 120)
    lines = machine.journal("tillsight@tills-m")
    # ten runs; the tenth restart is refused
    assert (gave_up["ActiveState"], gave_up["NRestarts"]) == ("failed", "10"), "\n".join([str(gave_up)] + lines[-5:])
    assert lines.count("tillsight@tills-m.service: Start request repeated too quickly.") == 1
    time.sleep(1)  # well past RestartSec=0.2: nothing starts it again
    assert machine.show("tillsight@tills-m")["NRestarts"] == "10"
    errors = [line for line in lines if "corrupt-age.onnx" in line]
    assert len(errors) == 10 and not any("Traceback" in line for line in lines), lines[-20:]
    # and the store's monitoring sees why, in the daemon's retained status
    host = machine.run("hostname").stdout.strip()
    assert subscriber.wait_for(lambda s: retained_status(s, f"{host}-tills-m"), 10)
    said = retained_status(subscriber, f"{host}-tills-m")[-1]
    assert said["state"] == "failed" and "corrupt-age.onnx cannot be loaded" in said["problems"][0], said
    # what an operator does once the model is fixed: a start alone is refused until the failure is reset
    assert machine.run("systemctl", "start", "tillsight@tills-m", check=False).returncode != 0
    machine.run("systemctl", "reset-failed", "tillsight@tills-m")
    assert machine.show("tillsight@tills-m")["ActiveState"] == "inactive"
