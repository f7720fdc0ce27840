"""The store's other daemons from their status messages: a copy of this daemon, a camera served twice,
and hostile status payloads. The daemons themselves, on a real broker: tests/test_pos.py."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

import edge.peers
from edge.peers import Peers
from edge.pos_terminal import Terminal
from tskit import Subscriber, start_daemon, stop_daemon, write_config

BASE = "tillsight/store-1"


def status(state="online", instance="other", cameras=("till-1",), **fields) -> bytes:
    body = {"schema": 1, "store": "store-1", "state": state, "instance": instance, **fields}
    if cameras is not None:
        body["cameras"] = {c: {"state": "online"} for c in cameras}
    return json.dumps(body).encode()


def peers() -> Peers:
    return Peers("till-pc", "mine", BASE, ["till-1", "till-2"])


def test_a_copy_of_this_daemon_is_a_problem_only_when_heard_live():
    watch = peers()
    watch.see(f"{BASE}/till-pc/status", status(instance="mine"), retained=False)  # our own echo
    watch.see(f"{BASE}/till-pc/status", status(instance="old"), retained=True)  # perhaps our previous run
    assert watch.problems() == []
    watch.see(f"{BASE}/till-pc/status", status(instance="clone", cameras=["till-7"]), retained=False)
    assert watch.problems() == ["another daemon publishes as daemon_id till-pc: give each till PC its own daemon_id "
                                "(a cloned till image keeps the host name)"]
    assert watch.camera_conflict("till-1") is None  # the copy serves other cameras


def test_a_camera_served_by_another_daemon_is_a_conflict_until_it_goes_offline():
    watch = peers()
    said_offline = []
    watch.on_change = lambda: said_offline.append(True)
    watch.see(f"{BASE}/till-pc-9/status", status(instance="b", cameras=["till-2", "till-3"]), retained=True)
    watch.see(f"{BASE}/till-pc-8/status", status(instance="c", cameras=["till-2"], state="degraded"), retained=False)
    assert watch.camera_conflict("till-1") is None
    assert watch.camera_conflict("till-2") == "also served by daemon till-pc-8, till-pc-9: each camera id belongs to one daemon"
    assert watch.problems() == [f"camera till-2 {watch.camera_conflict('till-2')}"]
    watch.see(f"{BASE}/till-pc-9/status", status(state="offline", instance="b", cameras=None), retained=True)
    watch.see(f"{BASE}/till-pc-8/status", status(state="offline", instance="c", cameras=None), retained=False)
    assert watch.problems() == [] and said_offline == []  # their offline is on their own topics
    watch.see(f"{BASE}/till-pc/status", status(instance="clone"), retained=False)
    watch.see(f"{BASE}/till-pc/status", status(state="offline", instance="clone", cameras=None), retained=False)
    assert watch.problems() == [] and said_offline == [True]  # a copy's offline on our topic: re-announce
    # a copy refused at start (a corrupt model) says failed on our topic: it runs no camera, and our topic's
    # retained status is now its failure, so we say we are here again
    watch.see(f"{BASE}/till-pc/status", status(instance="clone-2"), retained=False)
    watch.see(f"{BASE}/till-pc/status", status(state="failed", instance="clone-3", cameras=None), retained=False)
    watch.see(f"{BASE}/till-pc-9/status", status(state="failed", instance="d", cameras=None), retained=False)
    assert watch.problems() != [] and said_offline == [True, True]
    watch.see(f"{BASE}/till-pc/status", status(state="failed", instance="clone-2", cameras=None), retained=False)
    assert watch.problems() == []


def test_one_stream_under_two_camera_ids_in_two_daemons_is_a_conflict():
    """Two instances of a store server, a [[cameras]] block copied from one config to the other with its id changed
    and its address not: both tills answered from one till's picture. Statuses carry each network camera's stream
    fingerprint (a hash: no address or password in clear), and the other daemon's same stream is a conflict."""
    from edge.config import stream_fingerprint
    mine = stream_fingerprint("rtsp://admin:secret@10.1.2.3:554/stream1")
    watch = Peers("tills-a", "mine", BASE, ["till-1", "till-2"], {"till-2": mine})
    other = lambda stream: json.dumps({"schema": 1, "state": "online", "instance": "b", "cameras": {  # noqa: E731
        "till-9": {"state": "online", "stream": stream}}}).encode()
    watch.see(f"{BASE}/tills-b/status", other(stream_fingerprint("rtsp://10.1.2.3:554/stream2")), retained=False)
    assert watch.problems() == [] and watch.camera_conflict("till-2") is None  # another channel of that camera
    watch.see(f"{BASE}/tills-b/status", other(stream_fingerprint("RTSP://viewer@10.1.2.3:554/stream1")), retained=False)
    assert watch.camera_conflict("till-2") == ("shows the same stream as daemon tills-b's till-9: two tills would be "
                                               "answered about one till's customer")
    assert watch.problems() == [f"camera till-2 {watch.camera_conflict('till-2')}"]
    assert watch.camera_conflict("till-1") is None
    watch.see(f"{BASE}/tills-b/status", status(state="offline", instance="b", cameras=None), retained=False)
    assert watch.problems() == []
    assert stream_fingerprint(0) is None and stream_fingerprint("/videos/till.mp4") is None
    assert stream_fingerprint("rtsp://10.1.2.3/stream1") == mine  # the default port is the port
    assert "10.1.2.3" not in mine and "secret" not in mine and len(mine) == 16


def test_a_store_servers_instances_get_daemon_ids_of_their_own(monkeypatch):
    """tillsight@NAME sets TILLSIGHT_INSTANCE (deploy/tillsight-instance.conf): the default daemon_id takes it on,
    or every instance of a server would publish as its host name, and each find the others a copy of itself."""
    import socket
    from types import SimpleNamespace

    from edge.service import daemon_id
    assert daemon_id(SimpleNamespace(daemon_id="till-3")) == "till-3"  # the config's, where it names one

    def _hostname_id() -> str:
        return daemon_id(SimpleNamespace(daemon_id=None))

    monkeypatch.setattr(socket, "gethostname", lambda: "store-server.local")
    monkeypatch.delenv("TILLSIGHT_INSTANCE", raising=False)
    assert _hostname_id() == "store-server-local"
    monkeypatch.setenv("TILLSIGHT_INSTANCE", "tills-a")
    assert _hostname_id() == "store-server-local-tills-a"
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 70)
    monkeypatch.setenv("TILLSIGHT_INSTANCE", "tills-a")  # too long: the host name gives way, the instance stays
    assert _hostname_id() == "h" * 56 + "-tills-a"
    monkeypatch.delenv("TILLSIGHT_INSTANCE")
    assert _hostname_id() == "h" * 64  # a till PC's default as before
    monkeypatch.setenv("TILLSIGHT_INSTANCE", "x" * 70)
    assert _hostname_id() == "x" * 63
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    monkeypatch.setenv("TILLSIGHT_INSTANCE", "")
    assert _hostname_id() == "tillsight"
    monkeypatch.setattr(socket, "gethostname", lambda: "kassé-2")  # ASCII alone: other daemons read it as an id
    assert _hostname_id() == "kass--2" and edge.peers.DAEMON_LEVEL.fullmatch(_hostname_id())


def test_a_peer_silent_for_three_of_its_intervals_is_gone(monkeypatch):
    monkeypatch.setattr(edge.peers, "GRACE_S", 0.0)
    watch = peers()
    watch.see(f"{BASE}/till-pc-9/status", status(instance="b", status_interval_s=0.1), retained=False)
    assert watch.camera_conflict("till-1") is not None
    time.sleep(0.35)
    assert watch.camera_conflict("till-1") is None and watch.problems() == []


def test_a_retained_status_is_believed_only_as_long_as_its_own_time_allows():
    """A daemon that died without its will (the broker was down) leaves its `online` retained: the daemon that
    replaces it at that camera must not see a conflict at every start and every reconnect. A retained status is
    believed for what is left of its silent intervals, counted from its own time (with a minute for the clocks);
    one heard live is believed for the whole of them, whatever its clock says."""
    def said(seconds_ago: float) -> str:
        return datetime.fromtimestamp(time.time() - seconds_ago, timezone.utc).isoformat()

    watch = peers()
    watch.see(f"{BASE}/old-pc/status", status(instance="dead", time=said(3600), status_interval_s=30), retained=True)
    assert watch.camera_conflict("till-1") is None and watch.problems() == []
    watch.see(f"{BASE}/till-pc-9/status", status(instance="b", time=said(10), status_interval_s=30), retained=True)
    assert watch.camera_conflict("till-1") is not None  # 10 s ago: running, as far as anyone can tell
    watch.see(f"{BASE}/till-pc-9/status", status(instance="b", time=said(149.2), status_interval_s=30),
              retained=True)  # 3 x 30 s + 60 s for the clocks: 0.8 s left
    assert watch.camera_conflict("till-1") is not None
    time.sleep(1.0)
    assert watch.camera_conflict("till-1") is None
    watch.see(f"{BASE}/till-pc-8/status", status(instance="c", time=said(3600), status_interval_s=30), retained=False)
    assert watch.camera_conflict("till-1") is not None  # live: its clock is wrong, not its life
    assert edge.peers.stale(json.loads(status(time=said(3600), status_interval_s=30)), time.time()).startswith(
        "silent for 3600 s where it sends a status every 30 s")


def test_a_flood_of_made_up_daemons_is_remembered_in_bounds(monkeypatch):
    monkeypatch.setattr(edge.peers, "MAX_PEERS", 100)
    watch = peers()
    for n in range(1000):
        watch.see(f"{BASE}/fake-{n}/status", status(instance=f"i{n}", cameras=["till-1"]), retained=False)
    assert len(watch._current()) <= 100
    watch.see(f"{BASE}/till-pc-9/status", status(instance="real"), retained=False)
    assert watch.camera_conflict("till-1").startswith("also served by daemon ")
    assert "till-pc-9" in {p.daemon_id for p in watch._current()}  # remembered (three are named, the rest counted)


def test_a_flood_of_long_lived_made_up_daemons_never_hides_a_real_conflict(monkeypatch):
    """Statuses of other cameras claiming a day's interval were remembered too: past the bound, the soonest to
    expire went first, and that was always the real peer (a 30 s interval)."""
    monkeypatch.setattr(edge.peers, "MAX_PEERS", 100)
    watch = peers()
    watch.see(f"{BASE}/till-pc-9/status", status(instance="real", status_interval_s=30), retained=False)
    for n in range(1000):
        watch.see(f"{BASE}/fake-{n}/status", status(instance=f"i{n}", cameras=["till-9"], status_interval_s=86_400),
                  retained=False)
    assert watch.camera_conflict("till-1") == "also served by daemon till-pc-9: each camera id belongs to one daemon"
    assert len(watch._current()) == 1
    # a daemon that moves off our camera is forgotten
    watch.see(f"{BASE}/till-pc-9/status", status(instance="real", cameras=["till-7"]), retained=False)
    assert watch.camera_conflict("till-1") is None


def test_hostile_status_payloads_are_ignored_and_logged_in_bounds(caplog):
    watch = peers()
    hostile = [b"\xff\xfe", b"[" * 100_000, b"{}" + b" " * (300 * 1024), json.dumps({"state": 1}).encode(),
               json.dumps({"state": "online", "cameras": ["till-1"]}).encode(),
               json.dumps({"state": "online", "instance": "x" * 1000, "cameras": {"till-1": {}}}).encode(),
               json.dumps({"state": "online", "status_interval_s": -1, "cameras": {"till-1": {}}}).encode()] * 5
    with caplog.at_level(logging.WARNING, logger="edge.peers"):
        for payload in hostile:
            watch.see(f"{BASE}/evil/status", payload, retained=False)
        watch.see(f"{BASE}/evil/status", b"", retained=True)  # a cleared retained status: nothing to say
    assert watch.problems() == []
    assert 1 <= len(caplog.records) <= 6  # rate-limited: 5 lines, then a count of what was held back
    assert all(r.getMessage() == "status message of another daemon not understood" for r in caplog.records)


# ---------------------------------------------------------------- two real daemons on a real broker


def clone_config(tmp_path, broker, age_models, carphone_clip, **mqtt) -> Path:
    """One config for two daemons, as a cloned till PC has it."""
    return write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                        cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                        mqtt={"host": "127.0.0.1", "port": broker.port, **mqtt},
                        models={"age_model": str(age_models[40])}, logging={"level": "warning"})


def back_online_after(statuses: Subscriber, instance: str, timeout: float) -> bool:
    """After the clone has gone: the first daemon's status says online again."""
    heard = len(statuses.json("/status"))
    return statuses.wait_for(lambda s: any(m["instance"] == instance and m["state"] == "online"
                                           for m in s.json("/status")[heard:]), timeout)


@contextmanager
def daemons_of(config: Path, folder: Path):
    """The first daemon (logging to first.log), and room for its clone; whatever runs is stopped at the end."""
    running = {"first": start_daemon(config, folder / "first.log")}
    try:
        yield running
    finally:
        for process in running.values():
            stop_daemon(process)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.broker
def test_a_cloned_till_pc_is_found_both_answer_camera_fault_and_the_survivor_recovers(tmp_path, broker, age_models,
                                                                                      carphone_clip):
    """Two daemons with one config (a till PC cloned from another: same host name, same camera id)."""
    config = clone_config(tmp_path, broker, age_models, carphone_clip)
    statuses = Subscriber(broker.port, f"{BASE}/till-pc/status")
    with daemons_of(config, tmp_path) as daemons:
        assert statuses.wait_for(lambda s: any(m["state"] == "online" for m in s.json("/status")), 40)
        [instance] = {m["instance"] for m in statuses.json("/status")}
        daemons["clone"] = start_daemon(config, tmp_path / "clone.log")
        copy_problem = ("another daemon publishes as daemon_id till-pc: give each till PC its own daemon_id "
                        "(a cloned till image keeps the host name)")
        conflict = "also served by daemon till-pc (another instance): each camera id belongs to one daemon"
        assert statuses.wait_for(lambda s: any(m["instance"] == instance and copy_problem in m.get("problems", ())
                                               for m in s.json("/status")), 40), (tmp_path / "first.log").read_text()
        found = next(m for m in statuses.json("/status") if m["instance"] == instance and m.get("problems"))
        assert found["state"] == "degraded" and found["problems"] == [copy_problem, f"camera till-1 {conflict}"]
        answers = Subscriber(broker.port, f"{BASE}/pos/t1/reply")
        terminal = Terminal("127.0.0.1", broker.port, BASE, "t1")
        try:
            first_answer = terminal.check("till-1", "alcohol", timeout_s=5)
            time.sleep(1)  # the clone's answer too, if it was connected
        finally:
            terminal.close()
        assert first_answer["decision"] == "camera_fault" and first_answer["camera_fault"] == conflict
        assert {a["decision"] for a in answers.json("/reply")} == {"camera_fault"}
        answers.close()
        stop_daemon(daemons["clone"])  # the clone goes: its offline status lands on the shared topic
        assert back_online_after(statuses, instance, 20)
    statuses.close()
    lines = log_lines(tmp_path / "first.log")
    degraded = [line["problems"] for line in lines if line["msg"] == "degraded"]
    assert degraded and degraded[0][0] == copy_problem


@pytest.mark.broker
def test_two_daemons_under_one_configured_client_id_say_so_once_and_recover(tmp_path, broker, age_models,
                                                                            carphone_clip):
    """A cloned config that sets mqtt.client_id: the broker drops each daemon's connection when the other
    reconnects (mosquitto gives no reason code). Each says it once, not a line every 2 s."""
    config = clone_config(tmp_path, broker, age_models, carphone_clip, client_id="till-pc-1")
    statuses = Subscriber(broker.port, f"{BASE}/till-pc/status")
    taken = ("the broker dropped this connection 3 times in a row within 5 s of accepting it: another client with "
             "client id till-pc-1? (mqtt.client_id must be unique per daemon)")
    with daemons_of(config, tmp_path) as daemons:
        assert statuses.wait_for(lambda s: any(m["state"] == "online" for m in s.json("/status")), 40)
        [instance] = {m["instance"] for m in statuses.json("/status")}
        daemons["clone"] = start_daemon(config, tmp_path / "clone.log")
        assert statuses.wait_for(lambda s: any(m["instance"] == instance and taken in m.get("problems", ())
                                               for m in s.json("/status")), 40), (tmp_path / "first.log").read_text()
        time.sleep(6)  # the fight goes on: three more drops at least, which must not be logged
        stop_daemon(daemons["clone"])
        assert back_online_after(statuses, instance, 30)  # once a connection has held for 10 s
    statuses.close()
    lines = log_lines(tmp_path / "first.log")
    said = [line for line in lines if line["msg"] == "MQTT connection taken over"]
    assert len(said) == 1 and said[0]["level"] == "error" and said[0]["reason"] == taken
    lost = [line for line in lines if line["msg"] == "MQTT broker unreachable, retrying"]
    assert len(lost) <= 2, lost  # the first drops, before the pattern was clear; none after


@pytest.mark.broker
def test_a_broker_restarted_again_and_again_is_no_takeover(tmp_path, age_models, carphone_clip):
    """A broker up a second or two at a time (a crash loop, a flapping link to it) dropped the daemon's connection
    within 5 s of accepting it, three times in a row: said as another client under the daemon's id, at error. A
    takeover's broker accepts the next connection at once; a restarting one is away in between."""
    from edge.broker import LocalBroker
    with LocalBroker() as broker:
        config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                              cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                              mqtt={"host": "127.0.0.1", "port": broker.port},
                              models={"age_model": str(age_models[40])}, logging={"level": "info"})
        log = tmp_path / "daemon.log"
        daemon = start_daemon(config, log)
        try:
            for restart in range(1, 5):
                deadline = time.monotonic() + 40
                while log.read_text().count('"MQTT connected"') < restart and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert log.read_text().count('"MQTT connected"') == restart, log.read_text()[-2000:]
                time.sleep(1.0)
                broker.stop()
                time.sleep(1.5)  # away: the daemon's next attempt is refused
                broker.start()
            assert daemon.poll() is None
        finally:
            stop_daemon(daemon)
    said = [line["msg"] for line in log_lines(log)]
    assert said.count("MQTT connected") >= 4 and "MQTT connection taken over" not in said


def test_a_loopback_stream_is_the_machines_own(monkeypatch):
    """Two till PCs, each reading its own camera through a restreamer on itself (rtsp://127.0.0.1:8554/cam), show
    two streams, not one: a loopback address's fingerprint holds the host name (a store server's instances, one
    host, still match). A trailing '/' alone is no other stream."""
    import socket

    from edge.config import stream_fingerprint
    for source in ("rtsp://127.0.0.1:8554/cam", "rtsp://localhost:8554/cam", "rtsp://[::1]:8554/cam",
                   "rtsp://127.0.1.1:8554/cam"):
        monkeypatch.setattr(socket, "gethostname", lambda: "till-pc-1")
        first, again = stream_fingerprint(source), stream_fingerprint(source.replace("rtsp", "RTSP"))
        monkeypatch.setattr(socket, "gethostname", lambda: "till-pc-2")
        assert first == again != stream_fingerprint(source), source
    monkeypatch.setattr(socket, "gethostname", lambda: "till-pc-1")
    remote = stream_fingerprint("rtsp://10.1.2.3:8554/cam")
    monkeypatch.setattr(socket, "gethostname", lambda: "till-pc-2")
    assert stream_fingerprint("rtsp://10.1.2.3:8554/cam") == remote  # a camera on the network is everyone's
    assert stream_fingerprint("http://10.1.2.3") == stream_fingerprint("http://10.1.2.3/")


def test_a_status_under_no_daemon_id_is_ignored_and_a_problem_names_few(caplog):
    """A made-up status under a 60,000-character level (anyone with the daemons' login may write status topics) went
    into this daemon's problems and its own status, over the broker's packet limit: the broker dropped its every
    connection (2026-11-27 privacy review). A level that is no daemon id is ignored (said once); a flood of
    made-up conflicts names three daemons and counts the rest."""
    watch = peers()
    with caplog.at_level(logging.WARNING, logger="edge.peers"):
        for level in ("A" * 60_000, "a/b", "bad id", ""):
            watch.see(f"{BASE}/{level}/status", status(instance=f"x{len(level)}"), retained=False)
    assert watch.problems() == []
    said = [r for r in caplog.records if r.name == "edge.peers"]
    assert said and all(len(r.getMessage()) + len(str(getattr(r, "error", ""))) < 500 for r in said)
    for n in range(5):
        watch.see(f"{BASE}/tills-{n}/status", status(instance=f"i{n}"), retained=False)
    [problem] = watch.problems()
    assert problem == ("camera till-1 also served by daemon tills-0, tills-1, tills-2 and 2 more: each camera id "
                       "belongs to one daemon")


def test_a_peer_is_remembered_by_our_cameras_and_streams_only():
    """A made-up status naming our till-1 among 1,200 other cameras, each with a stream, was kept whole: ~475 KB a
    peer, and the bound of MAX_PEERS a few gigabytes, past the unit's MemoryMax (2026-11-27 review)."""
    from edge.config import stream_fingerprint
    mine = stream_fingerprint("rtsp://10.1.2.3:554/stream1")
    watch = Peers("till-pc", "mine", BASE, ["till-1", "till-2"], {"till-2": mine})
    listed = {f"made-up-{n}": {"state": "online", "stream": f"{n:016x}"} for n in range(1200)}
    listed |= {"till-1": {"state": "online", "stream": [1]},  # not a string: no stream, still our camera
               "lane-7": {"state": "online", "stream": mine}}
    watch.see(f"{BASE}/other/status", json.dumps({"schema": 1, "state": "online", "instance": "x",
                                                  "cameras": listed}).encode(), retained=False)
    [peer] = watch._current()
    assert peer.cameras == {"till-1"} and peer.streams == {mine: "lane-7"}
    assert watch.problems() == [
        "camera till-1 also served by daemon other: each camera id belongs to one daemon",
        "camera till-2 shows the same stream as daemon other's lane-7: two tills would be answered about one till's "
        "customer"]
