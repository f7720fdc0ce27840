"""The store's other daemons from their status messages: a copy of this daemon, a camera served twice,
and hostile status payloads. The daemons themselves, on a real broker: tests/test_pos.py."""

from __future__ import annotations

import json
import logging
import time

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


def test_a_peer_silent_for_three_of_its_intervals_is_gone(monkeypatch):
    monkeypatch.setattr(edge.peers, "GRACE_S", 0.0)
    watch = peers()
    watch.see(f"{BASE}/till-pc-9/status", status(instance="b", status_interval_s=0.1), retained=False)
    assert watch.camera_conflict("till-1") is not None
    time.sleep(0.35)
    assert watch.camera_conflict("till-1") is None and watch.problems() == []


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


@pytest.mark.broker
def test_a_cloned_till_pc_is_found_both_answer_camera_fault_and_the_survivor_recovers(tmp_path, broker, age_models,
                                                                                      carphone_clip):
    """Two daemons with one config (a till PC cloned from another: same host name, same camera id)."""
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                          cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    statuses = Subscriber(broker.port, f"{BASE}/till-pc/status")
    first = start_daemon(config, tmp_path / "first.log")
    clone = None
    try:
        assert statuses.wait_for(lambda s: any(m["state"] == "online" for m in s.json("/status")), 40)
        [instance] = {m["instance"] for m in statuses.json("/status")}
        clone = start_daemon(config, tmp_path / "clone.log")
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
        stop_daemon(clone)  # the clone goes: its offline status lands on the shared topic
        clone = None
        heard = len(statuses.json("/status"))
        assert statuses.wait_for(lambda s: any(m["instance"] == instance and m["state"] == "online"
                                               for m in s.json("/status")[heard:]), 20)
    finally:
        for process in (clone, first):
            if process is not None:
                stop_daemon(process)
        statuses.close()
    lines = [json.loads(line) for line in (tmp_path / "first.log").read_text().splitlines()]
    degraded = [line["problems"] for line in lines if line["msg"] == "degraded"]
    assert degraded and degraded[0][0] == copy_problem
