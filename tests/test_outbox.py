"""The durable outbox: nothing produced is lost across broker outages and daemon restarts.

Unit tests on a real SQLite file; then the real daemon (`tillsight run`) against a real mosquitto that
is stopped and started. The POS stand-in keeps a persistent session on a broker with persistence on,
so what the broker accepts while the POS is away is queued for it, as a real POS would configure it.
"""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from paho.mqtt import publish

from edge.broker import LocalBroker, find_mosquitto
from edge.config import MqttConfig
from edge.outbox import Outbox
from edge.peers import iso_seconds
from edge.policy import Policy
from edge.publish import Publisher
from edge.types import TrackEstimate
from tskit import REPO, Subscriber, absent, write_config

OUTAGE_S = 60  # the broker outage


# ---------------------------------------------------------------- the outbox itself

def test_rows_survive_a_reopen_in_order_and_acknowledged_ones_are_gone(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    keys = [box.add(f"t/{i}", b'{"n":%d}' % i, 1) for i in range(10)]
    for key in keys[:4]:
        box.done(key)
    assert box.status()["state"] == "disk" and box.depth() == 6
    box.close()
    again = Outbox(path)
    assert [row.topic for row in again.backlog()] == [f"t/{i}" for i in range(4, 10)]
    assert [row.payload for row in again.backlog()][0] == b'{"n":4}'
    new_key = again.add("t/new", b"{}", 1)
    assert new_key > keys[-1]  # new rows come after the old ones
    assert again.backlog()[-1].topic == "t/new"


def test_only_acknowledgements_skip_the_fsync_and_every_add_is_synced(tmp_path):
    """A delete may be lost to a power cut (the message is sent again: at-least-once), an add never: the
    connection is back at synchronous=FULL (2) after every delete, before the next message is written."""
    box = Outbox(tmp_path / "outbox.sqlite3")
    synchronous = lambda: box._db.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
    assert synchronous() == 2
    keys = [box.add(f"t/{i}", b"{}", 1) for i in range(3)]
    box.done(keys[0])
    assert synchronous() == 2
    box.max_messages = 1
    box.add("t/3", b"{}", 1)  # over the bound: the oldest are removed in the add's own call
    assert synchronous() == 2 and [row.topic for row in box.backlog()] == ["t/3"]
    box.close()
    assert [row.topic for row in Outbox(tmp_path / "outbox.sqlite3").backlog()] == ["t/3"]


def test_every_commit_is_timed_by_kind_for_the_metrics(tmp_path):
    """tillsight_outbox_commit_seconds: the commits that write messages (an fsync each, what an alert waits for)
    apart from those that only delete acknowledged rows; a failed write is no commit."""
    box = Outbox(tmp_path / "outbox.sqlite3")
    commits = []
    box.on_commit = lambda kind, seconds: commits.append((kind, seconds))
    first = box.add("t/1", b"{}", 1)
    assert [kind for kind, _ in commits] == ["messages"] and commits[0][1] > 0
    second, third = box.add("t/2", b"{}", 1, sync=False), box.add("t/3", b"{}", 1, sync=False)
    box.sync(third)  # both in one commit
    assert [kind for kind, _ in commits] == ["messages"] * 2
    for key in (first, second, third):
        box.done(key)
    box.tidy()
    assert [kind for kind, _ in commits] == ["messages", "messages", "deletes"] and all(s > 0 for _, s in commits)
    box.tidy()  # nothing to delete: no commit
    assert len(commits) == 3
    box._db.close()  # the file gone from under it: the add stays in memory, and no commit is timed
    box.add("t/4", b"{}", 1)
    assert len(commits) == 3 and box.state == "memory"
    box.close()


def test_a_message_after_the_outbox_closed_is_said_lost(tmp_path, caplog):
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.close()
    outbox.add("t/alert", b"late", 1)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "a message came after the outbox closed: lost"]


def test_bounded_by_count_and_by_age(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, max_messages=100)
    for i in range(150):
        box.add("t", b"%d" % i, 1)
    assert box.depth() == 100 and box.dropped == 50
    assert box.backlog()[0].payload == b"50"  # the oldest went
    box.close()
    time.sleep(0.2)
    old = Outbox(path, max_age_s=0.1)
    assert old.depth() == 0 and old.dropped == 100
    old.close()
    assert Outbox(path).depth() == 0  # and they are gone from the file too


def test_an_outbox_at_its_bound_drops_its_oldest_without_copying_the_queue_and_says_so_once_a_minute(tmp_path, caplog):
    """At the bound every add drops the oldest: each copied the whole key list under the lock the cameras and the
    broker's acks share (3.4 ms an add at 100,000 rows) and logged an error line (2,000 adds: 2,000 lines). Now an
    add at the bound allocates nothing the size of the queue, the first drop is said at once and the rest in one
    line a minute at most, with the count since; the status has the total."""
    import tracemalloc

    bound = 20_000
    box = Outbox(tmp_path / "outbox.sqlite3", max_messages=bound)
    for n in range(bound):
        box.add("t", b"%d" % n, 1, sync=False)
    box.sync(box.add("t", b"%d" % bound, 1, sync=False))  # the first over the bound
    tracemalloc.start()
    try:
        peaks = []
        for n in range(bound + 1, bound + 2000):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            box.add("t", b"%d" % n, 1)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    # a copy of the keys alone is 8 bytes a row; the dict's own table is rebuilt once in a few thousand inserts
    queue_sized = [peak for peak in peaks if peak > 8 * bound / 4]
    assert len(queue_sized) <= len(peaks) // 100, (len(queue_sized), sorted(peaks)[len(peaks) // 2])
    full = lambda: [r for r in caplog.records if r.getMessage() == "outbox full, oldest messages dropped"]  # noqa: E731
    assert [(r.levelname, r.since_last_line, r.dropped) for r in full()] == [("ERROR", 1, 1)]
    box._full_log.every_s = 0.0  # its minute is over: the service's tick says what came since
    box.tidy()
    assert [(r.since_last_line, r.dropped) for r in full()] == [(1, 1), (1999, 2000)]
    box.tidy()  # nothing new: nothing said
    assert len(full()) == 2 and box.status()["dropped"] == 2000 and box.depth() == bound
    box.close()
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (bound,)
        assert db.execute("SELECT payload FROM outbox ORDER BY key LIMIT 1").fetchone() == (b"2000",)  # the oldest went


def test_messages_too_old_are_dropped_while_the_outbox_runs_not_only_at_its_start(tmp_path, monkeypatch, caplog):
    """Only the start dropped rows older than max_age_s: a daemon up for weeks through a 3-day outage sent 3-day-old
    alerts at the broker's return and kept those per-person records past max_age_s. A row found too old when it
    is about to be sent (get()) is dropped then; the service's tick drops the rest, at most once a minute."""
    import edge.outbox

    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, max_age_s=1.0)
    old = [box.add("t/old", b"%d" % n, 1) for n in range(5)]
    time.sleep(1.05)
    fresh = [box.add("t/fresh", b"%d" % n, 1) for n in range(3)]
    box.tidy()  # not a minute since the start's sweep: nothing swept yet
    assert box.depth() == 8
    assert box.get(old[0]) is None and box.get(fresh[0]) is not None  # too old to send: dropped there and then
    monkeypatch.setattr(edge.outbox, "EXPIRED_SWEEP_EVERY_S", 0.0)  # the minute has passed
    box.tidy()
    assert [row.key for row in box.backlog()] == fresh and box.status()["dropped"] == 5
    with sqlite3.connect(path) as db:  # gone from the file too
        assert [key for key, in db.execute("SELECT key FROM outbox ORDER BY key")] == fresh
    said = [(r.since_last_line, r.dropped) for r in caplog.records
            if r.getMessage() == "outbox: messages too old to send dropped"]
    assert said == [(1, 1)]  # the sweep's 4 wait for the line a minute from now
    box.close()


def test_a_wall_clock_set_forward_never_makes_this_runs_messages_too_old(tmp_path, monkeypatch):
    """A till PC without a clock battery boots at an old time, then NTP sets it days forward: by the wall clock
    every message just queued was days old, and the running daemon dropped them all, alerts too. A row this run
    added is aged by the monotonic clock; a previous run's rows, by their wall time at the next start."""
    import edge.outbox

    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, max_age_s=3600.0)
    keys = [box.add("t/alert", b"%d" % n, 1) for n in range(3)]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * 86_400)  # NTP: two days on
    monkeypatch.setattr(edge.outbox, "EXPIRED_SWEEP_EVERY_S", 0.0)
    box.tidy()
    assert all(box.get(key) is not None for key in keys) and box.status()["dropped"] == 0
    box.close()
    again = Outbox(path, max_age_s=3600.0)  # the next start: by the wall clock, they are two days old now
    assert again.depth() == 0 and again.status()["dropped"] == 3
    again.close()


def test_a_corrupt_file_is_set_aside_and_the_outbox_goes_on_on_disk(tmp_path, caplog):
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not an SQLite database" * 100)
    box = Outbox(path)
    status = box.status()
    aside = Path(status["set_aside"]["file"])
    assert status["state"] == "disk" and status["reason"] is None and status["set_aside"]["recovered"] == 0
    assert aside.name.startswith("outbox.sqlite3.corrupt-") and aside.read_bytes().startswith(b"this is not")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].moved_to == str(aside)
    box.add("t", b"kept", 1)
    box.close()
    assert [row.payload for row in Outbox(path).backlog()] == [b"kept"]  # durable again


def test_the_readable_messages_of_a_damaged_file_are_recovered_in_order(tmp_path, caplog):
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    for n in range(200):
        box.add("tillsight/s/till-1/alert", f"{n:04d}".encode() * 250, 1)  # 1 kB each: ~50 pages of rows
    box.close()
    data = bytearray(path.read_bytes())
    page = 4096
    middle = len(data) // page // 2
    data[middle * page : (middle + 1) * page] = b"\xff" * page  # one page in the middle of the table destroyed
    path.write_bytes(bytes(data))
    recovered = Outbox(path)
    rows = recovered.backlog()
    numbers = [int(row.payload[:4]) for row in rows]
    assert recovered.status()["state"] == "disk" and recovered.status()["set_aside"]["recovered"] == len(rows)
    assert 150 <= len(rows) < 200, len(rows)  # all but the rows of the destroyed page
    assert numbers == sorted(numbers) and numbers[0] == 0 and numbers[-1] == 199
    assert all(row.payload == f"{n:04d}".encode() * 250 for row, n in zip(rows, numbers))
    recovered.close()
    assert len(Outbox(path).backlog()) == len(rows)  # in the new file, not only in memory
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


DISK_FULL = """
import resource, sys
from pathlib import Path
from edge.outbox import Outbox
from edge.peers import iso_seconds
box = Outbox(Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the file may grow no further
for i in range(2000):
    box.add("t/%d" % i, b"x" * 200, 1)
print(box.status()["state"], box.depth(), box.status()["reason"])
"""


DISK_FILLS_AND_FREES = """
import resource, sys, time
from pathlib import Path
from edge.outbox import Outbox
from edge.peers import iso_seconds
path = Path(sys.argv[1])
box = Outbox(path)
box.retry_after_s = 0.2
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # the disk is full
keys = [box.add("t/%d" % i, b"x" * 200, 1) for i in range(1000)]
assert box.state == "memory", box.status()
for key in keys[:300]:
    box.done(key)  # acknowledged while the disk is full: these must not come back
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space again
time.sleep(0.3)
keys.append(box.add("t/after", b"y", 1))
assert box.state == "disk", box.status()
box.close()
again = Outbox(path)
print(again.depth(), again.backlog()[0].topic, again.backlog()[-1].topic)
"""


def test_after_a_full_disk_the_outbox_goes_back_to_disk_with_exactly_the_pending_messages(tmp_path):
    result = subprocess.run([sys.executable, "-c", DISK_FILLS_AND_FREES, str(tmp_path / "outbox.sqlite3")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["701", "t/300", "t/after"]
    assert "outbox back on disk" in result.stderr


def test_a_full_disk_keeps_every_message_in_memory(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse to grow the file (EFBIG): a full disk as the process sees it
    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path / "outbox.sqlite3")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    state, depth, reason = result.stdout.split(" ", 2)
    assert state == "memory" and int(depth) == 2000 and "cannot write" in reason
    assert len([line for line in result.stderr.splitlines() if '"level": "error"' in line or "ERROR" in line]) <= 1


# ---------------------------------------------------------------- paho's limits, on a real broker

def test_the_test_brokers_persistence_keeps_a_retained_message_across_a_restart():
    """LocalBroker(persistence=True), which the outage tests below rely on: as root (CI), mosquitto switched to its
    own user, could not write its folder, and came back from a restart with nothing (no session, no retained
    message): those tests then failed now and then, for the broker's sake, not the daemon's."""
    needs_broker()
    with LocalBroker(persistence=True) as broker:
        publish.single("kept/status", b"online", qos=1, retain=True, hostname="127.0.0.1", port=broker.port)
        broker.stop()
        assert (broker.dir / "mosquitto.db").is_file()
        broker.start()
        back = Subscriber(broker.port, "kept/status")
        assert back.wait_for(lambda s: s.messages, 5), "the retained message did not survive the restart"
        back.close()


def connected_publisher(port: int, outbox: Outbox, **mqtt) -> Publisher:
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=port, keepalive_s=5, **mqtt), "store-1", "till-pc",
                          outbox)
    publisher.start()
    assert publisher.connected.wait(10)
    return publisher


def test_what_pahos_full_queue_cannot_take_waits_in_the_outbox_and_goes_in_order_once_it_has_room(tmp_path):
    """paho holds at most max_queued_messages unacknowledged, and never more than its 65,535 message ids: what
    it refuses during a long outage waits in the outbox and goes, after the rest and in order, as soon as the
    broker is back, not at the next start."""
    needs_broker()
    with LocalBroker(persistence=True) as broker:
        pos = Subscriber(broker.port, "tillsight/store-1/till-1/analytics/transaction", persistent_id="pos-1")
        publisher = connected_publisher(broker.port, Outbox(tmp_path / "outbox.sqlite3"), max_queued_messages=100)
        broker.stop()
        assert wait_until(lambda: not publisher.connected.is_set(), 15)
        for n in range(150):
            publisher.publish_transaction_band("till-1", f"T-{n}", "25-34")
        assert (publisher.unacknowledged(), publisher.outbox.depth(), publisher.dropped) == (150, 150, 0)
        broker.start()
        back = time.time()
        delivered = lambda: [b["transaction"] for b in pos.json("/analytics/transaction")]  # noqa: E731
        # the service calls send_held() every 0.1 s
        assert wait_until(lambda: publisher.send_held() or len(delivered()) >= 150, 30), len(delivered())
        # the status that says it is back found paho full too: it is sent once paho has room
        status = Subscriber(broker.port, "tillsight/store-1/till-pc/status")  # retained: the latest
        assert status.wait_for(lambda s: s.json("/status") and iso_seconds(s.json("/status")[-1]["time"]) >= back, 5)
        status.close()
        publisher.publish_transaction_band("till-1", "T-150", "25-34")
        assert wait_until(lambda: len(delivered()) >= 151, 10)
        assert publisher.stop({"state": "online"}) and publisher.dropped == 0
        pos.close()
    assert delivered() == [f"T-{n}" for n in range(151)]
    assert sqlite3.connect(tmp_path / "outbox.sqlite3").execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def test_an_alert_is_never_taken_as_acknowledged_by_the_ack_of_a_qos0_estimate_under_the_same_id(tmp_path):
    """mqtt.qos = 0: paho numbers QoS 0 and QoS 1 messages from the same 65,535 ids. Once they wrap, an
    alert must not be taken as acknowledged by a QoS 0 estimate's ack of long ago (and deleted from the outbox
    while the broker is down)."""
    needs_broker()
    with LocalBroker() as broker:
        publisher = connected_publisher(broker.port, Outbox(tmp_path / "outbox.sqlite3"), qos=0)
        estimate = TrackEstimate("till-1", 1, 40.0, 2.0, 5, time.time(), time.time(), (0, 0, 50, 50), 0.9)
        for _ in range(65_600):  # past the wrap
            publisher.publish_estimate(estimate, False, time.time())
        # its status acknowledged (a loaded CI machine's paho was still writing the 20 MB of estimates ahead of
        # reading its PUBACK when the broker stopped: 4 unacknowledged, not 3), then the last QoS 0 acks
        assert wait_until(lambda: publisher.unacknowledged() == 0, 60)
        time.sleep(1.0)
        broker.stop()
        assert wait_until(lambda: not publisher.connected.is_set(), 15)
        delivered = publisher.delivered  # its statuses
        for _ in range(3):
            publisher.publish_alert(estimate, Policy(), time.time())
        assert (publisher.unacknowledged(), publisher.outbox.depth(), publisher.delivered) == (3, 3, delivered)
        assert len(publisher._acked_early) <= 1024  # the QoS 0 acks nothing claims are bounded
        publisher.stop({"state": "online"}, timeout_s=0.5)


@pytest.mark.parametrize("disk_is_delivery", [True, False])
def test_a_stop_with_the_broker_away_waits_for_it_only_where_the_disk_is_no_delivery(tmp_path, disk_is_delivery):
    """The daemon's stop: what waits on disk is safe, sent at the next start, so the broker is not waited for. A
    replay's (disk_is_delivery False) waits its timeout and is no success: it exited 0 after 0.5 s."""
    from edge.broker import free_port
    path = tmp_path / "outbox.sqlite3"
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=free_port()), "store-1", "till-pc", Outbox(path))
    publisher.start()
    estimate = TrackEstimate("till-1", 1, 16.0, 2.0, 5, time.time(), time.time(), (0, 0, 50, 50), 0.9)
    publisher.publish_alert(estimate, Policy(), time.time())
    started = time.monotonic()
    assert publisher.stop({"state": "online"}, timeout_s=2, disk_is_delivery=disk_is_delivery) is disk_is_delivery
    waited = time.monotonic() - started
    # (paho's loop_stop joins its reconnect sleep, up to 1 s more on a loaded machine)
    assert waited < 1.9 if disk_is_delivery else waited >= 2
    assert publisher.kept_on_disk >= 1 and Outbox(path).depth() == publisher.kept_on_disk


# ---------------------------------------------------------------- the daemon, a broker that goes away

def needs_broker():
    if find_mosquitto() is None:
        absent("mosquitto is not installed (make test installs the Debian package)")


def daemon_config(tmp_path, port, clip, age_model, outbox):
    return write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc",
                        cameras=[{"id": "till-1", "source": str(clip), "fps_limit": 10}],
                        mqtt={"host": "127.0.0.1", "port": port, "keepalive_s": 5},
                        models={"age_model": str(age_model)}, outbox={"path": str(outbox)},
                        logging={"level": "warning"}, status_interval_s=5)


def start_daemon(config, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def queued_alerts(outbox) -> list[tuple[int, str]]:
    """(key, id) of the alerts waiting in the daemon's outbox file, in order."""
    with sqlite3.connect(outbox, timeout=5) as db:
        rows = db.execute("SELECT key, topic, payload FROM outbox ORDER BY key").fetchall()
    return [(key, json.loads(payload)["id"]) for key, topic, payload in rows if topic.endswith("/alert")]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def stop_daemon(daemon: subprocess.Popen) -> tuple[int, str]:
    daemon.send_signal(signal.SIGTERM)
    try:
        _, err = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
    return daemon.returncode, err


def test_a_60_s_broker_outage_loses_nothing_and_the_backlog_arrives_in_order_at_once(
        tmp_path, age_models, hamilton_clip):
    needs_broker()
    outbox = tmp_path / "outbox.sqlite3"
    with LocalBroker(persistence=True) as broker:
        pos = Subscriber(broker.port, "tillsight/#", persistent_id="pos-till-1")
        daemon = start_daemon(daemon_config(tmp_path, broker.port, hamilton_clip, age_models[16], outbox))
        try:
            assert pos.wait_for(lambda s: len(s.json("till-1/alert")) >= 1, 60), daemon.stderr
            broker.stop()
            outage_started = time.monotonic()
            assert wait_until(lambda: len(queued_alerts(outbox)) >= 3, OUTAGE_S)  # alerts made while it is down
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
            assert daemon.poll() is None
            waiting = queued_alerts(outbox)
            broker.start()
            back = time.monotonic()
            assert pos.wait_for(lambda s: {b["id"] for b in s.json("till-1/alert")} >= {i for _, i in waiting}, 30)
            arrived_after_s = time.monotonic() - back
            code, err = stop_daemon(daemon)
        finally:
            daemon.kill()
        pos.close()
    assert code == 0, err
    received = [b["id"] for b in pos.json("till-1/alert")]
    order = {alert_id: key for key, alert_id in waiting}
    keys = [order[i] for i in received if i in order]
    assert keys == sorted(keys) and len(set(keys)) == len(waiting)  # all of them, in the order they were made
    assert arrived_after_s < 5, f"backlog took {arrived_after_s:.1f} s after the broker came back"
    assert queued_alerts(outbox) == [] and sqlite3.connect(outbox).execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    print(f"{len(waiting)} alerts queued during a {OUTAGE_S} s outage, all delivered in order "
          f"{arrived_after_s:.2f} s after the broker came back")


def test_broker_down_daemon_killed_and_restarted_then_broker_back_loses_no_alert(tmp_path, age_models, hamilton_clip):
    needs_broker()
    outbox = tmp_path / "outbox.sqlite3"
    with LocalBroker(persistence=True) as broker:
        pos = Subscriber(broker.port, "tillsight/#", persistent_id="pos-till-1")
        config = daemon_config(tmp_path, broker.port, hamilton_clip, age_models[16], outbox)
        first = start_daemon(config)
        try:
            assert pos.wait_for(lambda s: any(b["state"] == "online" for b in s.json("till-pc/status")), 60)
            broker.stop()
            assert wait_until(lambda: len(queued_alerts(outbox)) >= 3, 60)
            first.send_signal(signal.SIGKILL)  # a power cut, an OOM kill
            first.wait(10)
        finally:
            first.kill()
        produced = [alert_id for _, alert_id in queued_alerts(outbox)]
        second = start_daemon(config)
        try:
            time.sleep(3)  # the restarted daemon runs, and queues more, with the broker still down
            assert second.poll() is None, second.stderr.read()
            broker.start()
            assert pos.wait_for(lambda s: {b["id"] for b in s.json("till-1/alert")} >= set(produced), 30), \
                f"lost: {set(produced) - {b['id'] for b in pos.json('till-1/alert')}}"
            code, err = stop_daemon(second)
        finally:
            second.kill()
        pos.close()
    assert code == 0, err
    assert "messages left by the previous run" in err
    print(f"{len(produced)} alerts made before kill -9 during the outage: 0 lost")


def test_a_corrupt_outbox_file_gives_one_line_and_the_daemon_serves_on_from_a_new_file(
        tmp_path, broker, subscriber, age_models, hamilton_clip):
    outbox = tmp_path / "outbox.sqlite3"
    # damaged from its first byte (zeros: a power cut, a torn write), its lock file beside it as the outbox leaves
    # it: the config check passes it to the outbox, which sets it aside; a refusal would stop the till for good
    # (exit 2 is not restarted)
    outbox.write_bytes(bytes(8192))
    Path(f"{outbox}.lock").write_bytes(b"till-pc\ntill-1\n")
    daemon = start_daemon(daemon_config(tmp_path, broker.port, hamilton_clip, age_models[16], outbox))
    try:
        assert subscriber.wait_for(lambda s: len(s.json("till-1/alert")) >= 1, 60)
        status = subscriber.json("till-pc/status")[-1]
        code, err = stop_daemon(daemon)
    finally:
        daemon.kill()
    assert status["state"] == "online" and status["outbox"]["state"] == "disk"
    assert status["outbox"]["set_aside"]["file"].startswith(f"{outbox}.corrupt-")
    assert code == 0, err
    assert len([line for line in err.splitlines() if "outbox" in line and '"error"' in line]) == 1


def test_a_full_disk_under_the_daemon_keeps_it_serving_and_says_so(
        tmp_path, broker, subscriber, age_models, hamilton_clip):
    outbox = tmp_path / "outbox.sqlite3"

    def small_files():  # in the daemon only: files may not grow past 48 KB (EFBIG, as with a full disk)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    daemon = start_daemon(daemon_config(tmp_path, broker.port, hamilton_clip, age_models[16], outbox),
                          preexec_fn=small_files)
    try:
        assert subscriber.wait_for(lambda s: any(b["outbox"]["state"] == "memory"
                                                 for b in s.json("till-pc/status")), 90), daemon.stderr
        count = len(subscriber.json("till-1/alert"))
        assert subscriber.wait_for(lambda s: len(s.json("till-1/alert")) > count, 30)  # still alerting
        status = [b for b in subscriber.json("till-pc/status") if b["outbox"]["state"] == "memory"][0]
        code, err = stop_daemon(daemon)
    finally:
        daemon.kill()
    assert status["state"] == "degraded" and "cannot write" in status["outbox"]["reason"]
    assert code == 0, err


def test_one_queue_file_serves_one_process(tmp_path):
    from edge.outbox import OutboxInUse
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path)
    with pytest.raises(OutboxInUse, match="in use by another tillsight process"):
        Outbox(path)
    first.close()
    Outbox(path).close()  # free again once the first is closed
    first = Outbox(path, owner="till-pc-1\ntill-1\ntill-2")  # the lock file names its holder: the refusal says whose
    with pytest.raises(OutboxInUse, match=r"in use by another tillsight process \(daemon till-pc-1\): each daemon "
                                          r"needs its own outbox file") as refused:
        Outbox(path, owner="till-pc-2\ntill-9")
    assert refused.value.holder == ["till-pc-1", "till-1", "till-2"]
    first.close()
    first = Outbox(path)  # a holder that wrote nothing (a version before): unknown, and said as before
    with pytest.raises(OutboxInUse, match=r"in use by another tillsight process: each daemon") as refused:
        Outbox(path, owner="till-pc-2")
    assert refused.value.holder is None
    first.close()


def test_a_second_daemon_on_the_same_outbox_file_is_refused_in_one_line(
        tmp_path, broker, subscriber, age_models, hamilton_clip, carphone_clip):
    """Two daemons on one queue file would send each other's messages twice and delete them under each other."""
    from test_cli import one_line_error
    from test_integration import replay_config
    from tskit import tillsight
    outbox = tmp_path / "outbox.sqlite3"
    daemon = start_daemon(daemon_config(tmp_path, broker.port, hamilton_clip, age_models[16], outbox))
    try:
        assert subscriber.wait_for(lambda s: s.json("till-pc/status"), 60), "the first daemon did not start"
        config = replay_config(tmp_path, broker.port, age_models[40], outbox={"path": str(outbox)})
        line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config), timeout=120))
        assert line == (f"tillsight: error: outbox.path {outbox} is in use by another tillsight process "
                        "(daemon till-pc): each daemon needs its own outbox file")
        assert daemon.poll() is None  # the first one serves on
    finally:
        stop_daemon(daemon)


def test_a_daemon_killed_outright_sends_its_interval_in_progress_at_the_next_start(tmp_path, broker, age_models,
                                                                                 carphone_clip):
    """Analytics: the customer counted before a kill -9 is in a partial interval sent by the next run, once."""
    import cv2
    import numpy as np
    from tskit import MjpegCamera, clear_of_a_day_boundary
    from tskit import start_daemon as start_logged
    from tskit import stop_daemon as stop_logged
    clear_of_a_day_boundary()  # a 15-minute interval ending mid-test (08:15:00, ...) would send the count itself
    camera = MjpegCamera(carphone_clip, fps=10).start()
    customer = camera.jpegs
    outbox = tmp_path / "outbox.sqlite3"
    kept = Path(f"{outbox}.analytics.json")
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc",
                          cameras=[{"id": "till-1", "source": camera.url, "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port}, models={"age_model": str(age_models[40])},
                          outbox={"path": str(outbox)}, analytics={"k": 1, "interval_s": 86_400}, tracking={"lost_after_s": 0.5})
    analytics = Subscriber(broker.port, "tillsight/store-1/till-1/analytics")
    estimates = Subscriber(broker.port, "tillsight/store-1/till-1/estimate")
    first = start_logged(config, tmp_path / "first.log")
    try:
        def counted() -> bool:
            return kept.exists() and json.loads(kept.read_text()).get("till-1", {}).get("counts") == {"35-44": 1}
        assert estimates.wait_for(lambda s: len(s.messages) >= 3, 60), (tmp_path / "first.log").read_text()
        empty_till = np.full((144, 176, 3), 90, np.uint8)
        cv2.rectangle(empty_till, (20, 30), (150, 60), (40, 160, 200), -1)
        camera.jpegs = [cv2.imencode(".jpg", empty_till)[1].tobytes()]  # the customer left
        assert wait_until(counted, 20), kept.read_text()
        first.send_signal(signal.SIGKILL)  # a power cut, an OOM kill: no partial interval sent
        first.wait(10)
        assert analytics.messages == []
        camera.jpegs = customer
        second = start_logged(config, tmp_path / "second.log")
        try:
            assert analytics.wait_for(lambda s: s.messages, 60), (tmp_path / "second.log").read_text()
        finally:
            stop_logged(second)
        assert analytics.wait_for(lambda s: len(s.messages) >= 2, 10)  # and the second run's own, at its stop
    finally:
        first.kill()
        camera.stop()
        analytics.close()
        estimates.close()
    assert len({m["id"] for m in analytics.json("/analytics")}) == len(analytics.messages)  # each sent once
    left, own = analytics.json("/analytics")[:2]
    assert left["partial"] and left["bands"]["35-44"] == 1 and sum(v or 0 for v in left["bands"].values()) == 1
    assert own["partial"] and own["interval_start"] > left["interval_end"]  # the kill's gap is no one's time
    assert own["bands"]["35-44"] in (0, 1)  # the second run saw the customer again, or not yet: never the first's
    assert json.loads(kept.read_text()) == {}  # the clean stop sent its interval itself
    assert "analytics intervals the previous run left open sent as partial" in (tmp_path / "second.log").read_text()


def test_the_ack_histogram_times_the_broker_not_an_outage(tmp_path):
    """tillsight_mqtt_ack_seconds is the broker's time to acknowledge: a message queued while the broker was away
    was timed until its PUBACK after the reconnect, and the dashboard's p99 showed the outage."""
    needs_broker()
    with LocalBroker() as broker:
        publisher = connected_publisher(broker.port, Outbox(tmp_path / "outbox.sqlite3"))
        timed: list[float] = []
        publisher.on_ack = timed.append
        publisher.publish_transaction_band("till-1", "T-0", "25-34")
        assert wait_until(lambda: publisher.unacknowledged() == 0 and timed, 10)
        before = len(timed)
        broker.stop()
        assert wait_until(lambda: not publisher.connected.is_set(), 15)
        for n in range(1, 4):
            publisher.publish_transaction_band("till-1", f"T-{n}", "25-34")
        time.sleep(1.0)  # the outage: a second at least
        broker.start()
        assert wait_until(lambda: publisher.send_held() or publisher.unacknowledged() == 0, 30)
        after = len(timed)  # (the status that says it is back, sent on the new connection, is timed)
        publisher.publish_transaction_band("till-1", "T-4", "25-34")
        assert wait_until(lambda: publisher.unacknowledged() == 0 and len(timed) == after + 1, 10), timed
        assert publisher.stop({"state": "online"})
    assert after - before <= 1 and max(timed) < 1.0, timed  # the three of the outage are not timed


@contextmanager
def outage_before_a_pos(tmp_path, **bounds):
    """A POS whose session the broker keeps (persistence) and a publisher with an outbox of `bounds`; the broker
    stopped once everything was acknowledged, and the publisher's first try to reconnect failed, so new messages
    are held back in the outbox (before that try, paho queues them itself). Yields (broker, publisher, what the POS
    got: the transactions); on leaving, the publisher stops and anything more would have come."""
    needs_broker()
    with LocalBroker(persistence=True) as broker:
        pos = Subscriber(broker.port, "tillsight/store-1/till-1/analytics/transaction", persistent_id="pos-1")
        publisher = connected_publisher(broker.port, Outbox(tmp_path / "outbox.sqlite3", **bounds))
        assert wait_until(lambda: publisher.unacknowledged() == 0, 10)
        broker.stop()
        assert wait_until(lambda: "refused" in (publisher.connection_error or ""), 15), publisher.connection_error
        yield broker, publisher, lambda: [b["transaction"] for b in pos.json("/analytics/transaction")]
        assert publisher.stop({"state": "online"})
        time.sleep(0.5)
        pos.close()


def test_messages_the_outbox_dropped_leave_the_held_back_queue_and_are_not_counted_unacknowledged(tmp_path):
    """Broker down, outbox bound 1,000, 200,000 messages: the held-back queue kept all 200,000 (21 MB) while the
    outbox kept 1,000, and unacknowledged() (in the status, the reload check and the exit line) said 200,000. Now
    it says what is still to be delivered, and the broker's return delivers exactly that."""
    with outage_before_a_pos(tmp_path, max_messages=100) as (broker, publisher, delivered):
        for n in range(1000):
            publisher.publish_transaction_band("till-1", f"T-{n}", "25-34")
        waiting = publisher.unacknowledged()
        assert (waiting, publisher.outbox.depth(), publisher.outbox.dropped) == (100, 100, 900)
        assert len(publisher._held) <= 100
        broker.start()
        assert wait_until(lambda: publisher.send_held() or len(delivered()) >= waiting, 30), len(delivered())
    assert delivered() == [f"T-{n}" for n in range(900, 1000)]


def test_a_message_held_back_through_an_outage_longer_than_max_age_is_never_sent(tmp_path):
    """A message held back in the outbox through an outage longer than max_age_s was sent at the broker's return
    (a 3-day-old alert, on the till's screen): it is dropped instead, and what came since goes."""
    with outage_before_a_pos(tmp_path, max_age_s=2.0) as (broker, publisher, delivered):
        for n in range(5):
            publisher.publish_transaction_band("till-1", f"old-{n}", "25-34")
        time.sleep(2.2)  # longer than max_age_s
        delivered_before = publisher.delivered
        broker.start()
        # its status, sent on the new connection, is acknowledged: paho's re-send is over and what is held may go
        assert wait_until(lambda: publisher.delivered > delivered_before, 30)
        for n in range(3):
            publisher.publish_transaction_band("till-1", f"new-{n}", "25-34")
        assert wait_until(lambda: publisher.send_held() or len(delivered()) >= 3, 30), delivered()
    assert delivered() == ["new-0", "new-1", "new-2"] and publisher.outbox.dropped == 5

def test_the_topics_the_broker_refuses_are_remembered_and_said_within_bounds(tmp_path, caplog):
    """Each reply topic the broker's ACL refused stayed in a set for ever, with an error line each: a POS whose
    every check names its own reply topic grew both without end. The latest DENIED_TOPICS_KEPT are remembered
    (one of them refused again is not said again), and the new ones are said in one line a minute at most, with
    the count since; `denied` counts every refusal."""
    needs_broker()
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite tillsight/#\n")  # anonymous clients: the POS's reply topics are refused
    with LocalBroker(extra_config=f"acl_file {acl}") as broker:
        publisher = connected_publisher(broker.port, Outbox(None))
        assert wait_until(lambda: publisher.unacknowledged() == 0, 10)  # its status: what is held may go
        checks = 400  # more than are remembered
        for n in range(checks):
            publisher.publish_reply(f"pos/till-1/reply/{n}", {"answer": n}, b"%d" % n)
        assert wait_until(lambda: publisher.denied == checks, 30), publisher.denied
        refused = lambda: [r for r in caplog.records if r.getMessage() == "MQTT broker refused a message (ACL?)"]  # noqa: E731
        assert len(refused()) == 1, len(refused())
        assert (refused()[0].topic, refused()[0].since_last_line) == ("pos/till-1/reply/0", 1)
        from edge.publish import DENIED_TOPICS_KEPT
        assert len(publisher._denied_topics) == DENIED_TOPICS_KEPT < checks
        publisher._denied_log.every_s = 0.0  # its minute is over: the service's tick says what came since
        publisher.send_held()
        assert [(r.since_last_line, r.denied) for r in refused()] == [(1, 1), (checks - 1, checks)]
        publisher.publish_reply(f"pos/till-1/reply/{checks - 1}", {"answer": "again"}, None)  # a recent one again
        assert wait_until(lambda: publisher.denied == checks + 1, 10)
        publisher.send_held()
        assert len(refused()) == 2
        publisher.stop({"state": "online"}, timeout_s=2)


def test_an_acknowledged_message_does_not_stay_on_disk(tmp_path, monkeypatch):
    """The write-ahead log kept every message written since its last reset, acknowledged or not (197 estimates with
    their transaction ids after a kill -9, 2026-11-27 privacy review), and a deleted row's bytes stayed in the
    file's free pages. Once nothing waits, the service's tick folds the log in and cuts it to nothing, the deleted
    rows zeroed: the last messages of the day too. A reader holding the file (a backup tool) is not waited for, on
    any thread: the next tick does it. Looked for as bytes in every file of the folder, as a disk reader would."""
    import sqlite3

    import edge.outbox
    monkeypatch.setattr(edge.outbox, "WAL_TRUNCATE_EVERY_S", 0.0)
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)

    def on_disk(marker: bytes) -> dict:
        return {f.name: marker in f.read_bytes() for f in tmp_path.iterdir() if f.is_file() and marker in f.read_bytes()}

    keys = [outbox.add("tillsight/s/till-1/estimate", b'{"transaction":"RCPT-0001","n":%d}' % n, 1) for n in range(200)]
    assert on_disk(b"RCPT-0001")  # on disk while it waits
    for key in keys:
        outbox.done(key)
    outbox.tidy()
    assert on_disk(b"RCPT-0001") == {}
    outbox.done(outbox.add("tillsight/s/till-1/estimate", b'{"transaction":"RCPT-0002"}', 1))  # the day's last
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM outbox").fetchone()
    started = time.monotonic()
    outbox.tidy()  # the reader holds the log: not waited for
    assert time.monotonic() - started < 1.0 and outbox.status()["state"] == "disk"
    reader.rollback()
    reader.close()
    outbox.tidy()
    assert on_disk(b"RCPT-0002") == {}
    outbox.close()


def test_a_corrupt_file_set_aside_is_removed_after_a_week(tmp_path):
    """Set aside "for a person to look at", a corrupt outbox (per-person records) was kept for ever."""
    import os

    from edge.outbox import CORRUPT_KEPT_S
    path = tmp_path / "outbox.sqlite3"
    old, recent = (tmp_path / f"outbox.sqlite3.corrupt-2026010{n}T000000" for n in (1, 2))
    for aside in (old, recent, tmp_path / "other.sqlite3.corrupt-20260101T000000"):
        aside.write_bytes(b"damaged")
    os.utime(old, (time.time() - CORRUPT_KEPT_S - 60,) * 2)
    os.utime(tmp_path / "other.sqlite3.corrupt-20260101T000000", (0, 0))  # another outbox's: not this one's to clear
    Outbox(path).close()
    assert sorted(f.name for f in tmp_path.iterdir() if "corrupt" in f.name) == [
        "other.sqlite3.corrupt-20260101T000000", recent.name]
    # a file set aside now keeps its week, however long ago it was last written (a till off for a fortnight)
    path.write_bytes(b"not a database at all, " * 200)
    os.utime(path, (time.time() - CORRUPT_KEPT_S - 60,) * 2)
    Outbox(path).close()
    Outbox(path).close()  # the next start (a reload)
    assert len([f for f in tmp_path.iterdir() if f.name.startswith("outbox.sqlite3.corrupt-2026") and
                f.name != recent.name]) == 1


def test_messages_added_together_share_a_commit_and_acknowledgements_never_wait_for_the_disk(tmp_path, monkeypatch):
    """Group commit (issue 10): on a disk whose fsync takes 5 ms, one fsync a message under the lock every camera
    added under put every camera behind the disk (frame->alert p99 58 ms against 31, 6 cameras). Each add still
    returns only once its row is committed; the rows added while a commit runs go in the next one together; and
    the broker's acknowledgements (paho's thread) never wait for a commit: their rows go with the next one (or the
    service's tick)."""
    import threading

    commits: list[int] = []
    slow_commit = Outbox._commit

    def commit(self, rows, deletes):
        if rows:
            commits.append(len(rows))
            time.sleep(0.02)  # a slow disk's fsync
        slow_commit(self, rows, deletes)

    monkeypatch.setattr(Outbox, "_commit", commit)
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    keys: list[int] = []

    def camera(n: int) -> None:
        for i in range(10):
            key = box.add(f"t/{n}/{i}", b"{}", 1)
            assert box._written_upto >= key  # on disk when add returns
            keys.append(key)

    threads = [threading.Thread(target=camera, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(commits) == 80 and len(commits) < 80 and max(commits) >= 3  # grouped: fewer fsyncs than messages
    assert sorted(keys) == list(range(1, 81))

    in_commit = threading.Thread(target=box.add, args=("t/slow", b"{}", 1))
    monkeypatch.setattr(time, "sleep", lambda s, real=time.sleep: real(0.5))  # the next commit: half a second
    in_commit.start()
    while not box._disk_lock.locked():
        pass
    started = time.monotonic()
    for key in keys[:40]:
        box.done(key)  # paho's thread, at the broker's acks, while that commit holds the disk
    assert time.monotonic() - started < 0.2
    in_commit.join()
    box.tidy()  # the service's tick: the acknowledged rows off the disk
    box.close()
    again = Outbox(path)
    assert len(again.backlog()) == 41 and [r.topic for r in again.backlog()][-1] == "t/slow"
    again.close()


def test_a_frames_messages_go_to_disk_in_one_commit_then_to_paho_in_order(tmp_path, monkeypatch):
    """A camera's frame with two customers published four messages, each waiting its own fsync before the next:
    in a frame batch they are committed together, and handed to paho in the order they were published."""
    commits: list[int] = []
    real_commit = Outbox._commit
    monkeypatch.setattr(Outbox, "_commit", lambda self, rows, deletes: (commits.append(len(rows)) if rows else None,
                                                                        real_commit(self, rows, deletes))[1])
    box = Outbox(tmp_path / "outbox.sqlite3")
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=1), "s", "till-pc", box)  # never connected: paho queues
    sent: list[str] = []  # handed on (to paho, or behind what it holds back while it is not connected)
    real_submit = publisher._submit
    monkeypatch.setattr(publisher, "_submit", lambda key, topic, *rest: (sent.append(topic),
                                                                          real_submit(key, topic, *rest))[1])
    estimate = TrackEstimate("till-1", 1, 17.0, 2.0, 5, 0.0, 1.0, (0, 0, 10, 10), 0.9)
    with publisher.frame_batch():
        publisher.publish_alert(estimate, Policy(), 1.0)
        publisher.publish_estimate(estimate, False, 1.0)
        publisher.publish_estimate(estimate, True, 1.0)
        assert sent == [] and commits == []  # nothing on its way before the frame's commit
    assert commits == [3] and sent == ["tillsight/s/till-1/alert"] + ["tillsight/s/till-1/estimate"] * 2
    publisher.publish_estimate(estimate, False, 2.0)  # outside a frame batch: at once
    assert commits == [3, 1] and len(sent) == 4
    assert [r.topic for r in box.backlog()] == sent  # all kept until the broker has them
    box.close()


def test_acknowledged_rows_go_with_the_next_commit_and_an_add_during_the_close_is_said_lost(tmp_path, caplog):
    """(Review of the group commit.) On a busy disk the tick seldom finds the disk free: the acknowledged rows go
    with the next add's commit as well, not only with the tick's. And an add that comes while the outbox closes is
    said lost, not left believing it is on disk."""
    import sqlite3
    import threading
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    keys = [box.add(f"t/{i}", b"{}", 1) for i in range(5)]
    for key in keys:
        box.done(key)  # no tick (tidy) runs
    box.add("t/next", b"{}", 1)
    with sqlite3.connect(path) as reader:
        assert [t for (t,) in reader.execute("SELECT topic FROM outbox")] == ["t/next"]
    closing, late = threading.Event(), []
    real_commit = Outbox._commit

    def slow_commit(self, rows, deletes):  # the close's own commit, long enough for an add to come in
        closing.set()
        time.sleep(0.3)
        real_commit(self, rows, deletes)

    Outbox._commit = slow_commit
    try:
        closer = threading.Thread(target=box.close)
        closer.start()
        assert closing.wait(5)
        with caplog.at_level("ERROR", logger="edge.outbox"):
            late.append(box.add("t/late", b"{}", 1))
        closer.join()
    finally:
        Outbox._commit = real_commit
    assert "a message came after the outbox closed: lost" in caplog.text
    again = Outbox(path)
    assert [r.topic for r in again.backlog()] == ["t/next"]
    again.close()


def test_a_frame_batch_inside_another_and_qos0_estimates_keep_the_frames_order(tmp_path, monkeypatch):
    """(Review of the frame batch.) A batch inside a batch sends nothing of its own before the outer one ends, and
    with `mqtt.qos = 0` the estimates (kept nowhere) still go after the alert published before them."""
    box = Outbox(tmp_path / "outbox.sqlite3")
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=1, qos=0), "s", "till-pc", box)
    order: list[str] = []
    monkeypatch.setattr(publisher, "_submit", lambda key, topic, *rest: order.append(topic))
    monkeypatch.setattr(publisher, "_send", lambda topic, *rest: order.append(topic) or True)
    estimate = TrackEstimate("till-1", 1, 17.0, 2.0, 5, 0.0, 1.0, (0, 0, 10, 10), 0.9)
    with publisher.frame_batch():
        publisher.publish_alert(estimate, Policy(), 1.0)
        with publisher.frame_batch():
            publisher.publish_estimate(estimate, False, 1.0)  # QoS 0
        publisher.publish_estimate(estimate, True, 1.0)
        assert order == []
    assert order == ["tillsight/s/till-1/alert"] + ["tillsight/s/till-1/estimate"] * 2
    assert [r.topic for r in box.backlog()] == ["tillsight/s/till-1/alert"]  # QoS 0: not kept
    box.close()


def test_an_outbox_folder_the_daemon_may_not_write_in_is_said_with_the_setting(tmp_path):
    """SQLite's "unable to open database file" was all the line said: neither permissions nor outbox.path."""
    import os
    import shutil
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    # root writes anywhere: as root, without the capability that lets it (as the service's own user would be)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if drop and shutil.which("setpriv") is None:
        absent("setpriv (util-linux) is not installed")
    script = ("import sys; from pathlib import Path; from edge.outbox import Outbox; "
              "outbox = Outbox(Path(sys.argv[1])); print(outbox.state); print(outbox.reason)")
    result = subprocess.run(drop + [sys.executable, "-c", script, str(folder / "outbox.sqlite3")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == [
        "memory", f"cannot use {folder / 'outbox.sqlite3'}: unable to open database file (its folder {folder} is not "
                  f"writable by uid {os.geteuid()}: change its owner or mode, or outbox.path)"], result.stderr
