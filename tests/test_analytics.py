"""Store analytics: age-band counts per camera per interval, small bands suppressed, nothing per person."""

import json
import re

import pytest

from edge.analytics import AgeBandCounter, OpenIntervals, band_names, band_of
from edge.config import ConfigError, parse_config
from tskit import clear_of_a_day_boundary, tillsight, write_config


def test_bands_and_suppression_of_small_counts():
    assert band_names([18, 25, 35]) == ["0-17", "18-24", "25-34", "35+"]
    assert [band_of(a, [18, 25]) for a in (3, 17.9, 18, 24.99, 25, 80)] == ["0-17", "0-17", "18-24", "18-24", "25+", "25+"]
    counter = AgeBandCounter("till-1", [18, 25], interval_s=900, k=3)
    counter.open(900.0)  # counting began as the interval did
    for age in (20, 21, 22, 40, 16):
        counter.add(age, now=1000.0)
    assert not counter.due(1799.0) and counter.due(1800.0)
    message = counter.flush(1800.0)
    assert message["interval_start"] == 900.0 and message["interval_end"] == 1800.0  # aligned to the clock
    assert message["partial"] is False
    assert message["bands"] == {"0-17": None, "18-24": 3, "25+": None}  # 1 and 1 are below k: not published
    assert "customers" not in message and "total" not in message  # no subtraction to undo the suppression
    assert counter.flush(1900.0) is None  # no interval opened since


def test_an_interval_without_customers_is_sent_with_the_time_the_camera_could_not_see():
    counter = AgeBandCounter("till-1", [18, 25], interval_s=900, k=3)
    counter.open(900.0)
    counter.fault_s += 312.46  # the lens was covered for five minutes
    message = counter.flush(1800.0)
    assert message["bands"] == {"0-17": 0, "18-24": 0, "25+": 0} and message["camera_fault_s"] == 312.5
    counter.open(1800.0)
    counter.add(40, 1801.0)
    message = counter.flush(2700.0)
    assert message["bands"] == {"0-17": 0, "18-24": 0, "25+": None} and message["camera_fault_s"] == 0.0


def test_intervals_cover_only_the_time_counted_so_a_restart_gives_two_partial_halves():
    """A daemon stopped at 08:07:10 and started again at 08:07:12 (a reload, an upgrade): before, the new one
    sent 08:00-08:15 as a whole interval, overlapping the 08:00-08:07:10 the old one had sent."""
    edges = [18, 25]
    first = AgeBandCounter("till-1", edges, interval_s=900, k=1)
    first.open(900.0)
    first.add(20, 1100.0)
    before_stop = first.flush(1330.0, partial=True)
    second = AgeBandCounter("till-1", edges, interval_s=900, k=1)  # the new process
    second.open(1332.0)
    second.add(40, 1500.0)
    after_start = second.flush(1800.0)
    assert (before_stop["interval_start"], before_stop["interval_end"], before_stop["partial"]) == (900.0, 1330.0, True)
    assert (after_start["interval_start"], after_start["interval_end"], after_start["partial"]) == (1332.0, 1800.0, True)
    assert before_stop["bands"] == {"0-17": 0, "18-24": 1, "25+": 0} and after_start["bands"]["25+"] == 1
    second.open(1800.2)  # from here on whole intervals again, aligned to the clock
    whole = second.flush(2700.0)
    assert whole | {"bands": None, "opening": None} == {"camera": "till-1", "interval_start": 1800.0,
                                                        "interval_end": 2700.0, "bands": None, "k": 1,
                                                        "partial": False, "camera_fault_s": 0.0,
                                                        "store_closed_s": 0.0, "opening": None}
    assert re.fullmatch(r"[0-9a-f]{32}", whole["opening"]) and whole["opening"] != after_start["opening"]
    second.open(2750.0)
    resumed_at = 2750.0 - 3600  # the wall clock stepped back an hour: the interval so far ends, counting resumes
    assert second.flush(2751.0, partial=True)["interval_start"] == 2700.0
    second.open(resumed_at)
    assert second.flush(resumed_at + 60, partial=True)["interval_start"] == resumed_at


def test_intervals_are_aligned_to_the_stores_local_clock():
    """An hourly interval in Mumbai (UTC+5:30) ran from half past to half past there, a daily one in Sydney
    from 10:00 to 10:00: aligned to UTC. Local midnight and local hours now, as a store reads its figures."""
    from datetime import datetime, timezone
    utc = lambda *when: datetime(*when, tzinfo=timezone.utc).timestamp()  # noqa: E731
    hourly = AgeBandCounter("till-1", [18], interval_s=3600, k=1, utc_offset_s=lambda t: 5.5 * 3600, joined=False)
    hourly.open(utc(2026, 11, 26, 4, 10))  # 09:40 in Mumbai
    assert hourly.flush(utc(2026, 11, 26, 4, 30))["interval_start"] == utc(2026, 11, 26, 3, 30)  # 09:00 there
    daily = AgeBandCounter("till-1", [18], interval_s=86400, k=1, utc_offset_s=lambda t: 11 * 3600, joined=False)
    daily.open(utc(2026, 11, 26, 2, 0))  # 13:00 in Sydney (summer time)
    message = daily.flush(utc(2026, 11, 26, 13, 0))
    assert (message["interval_start"], message["interval_end"]) == (utc(2026, 11, 25, 13, 0), utc(2026, 11, 26, 13, 0))
    assert daily.due(utc(2026, 11, 26, 13, 0)) is False  # flushed; nothing open


def test_a_customer_found_gone_after_their_interval_was_sent_is_counted_in_the_next_and_no_slot_is_sent_twice():
    """The pipeline's order (edge/service.py): a frame first sends the interval that has ended, then ends the tracks
    of customers gone from it, each counted at their last face. One last seen just before the boundary reopened the
    interval just sent, and the next frame sent 00:15-00:30 again, whole, over that customer alone (2026 review)."""
    counter = AgeBandCounter("till-1", [25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0, joined=False)
    sent = []

    def frame(now: float, gone_last_seen: tuple[float, ...] = ()) -> None:
        counter.open(now)
        if counter.due(now):
            sent.append(counter.flush(now))
        for last_seen in gone_last_seen:
            counter.add(40, last_seen)

    frame(900.0)
    frame(1000.0, gone_last_seen=(998.0,))
    frame(1800.1, gone_last_seen=(1799.0,))  # sends 00:15-00:30, and finds a customer last seen in it gone
    frame(1801.5, gone_last_seen=(1799.9,))  # lost_after_s (1.5) after their last face: a later frame
    frame(2700.0)
    assert [(m["interval_start"], m["interval_end"], m["partial"], m["bands"]) for m in sent] == [
        (900.0, 1800.0, False, {"0-24": 0, "25+": 1}), (1800.0, 2700.0, False, {"0-24": 0, "25+": 2})]
    counter.add(40, 2699.0)  # on a quiet camera's tick as well
    assert counter.flush(2750.0, partial=True)["interval_start"] == 2700.0


def zone_offset(zone_name: str):
    """A real time zone's UTC offset, whatever the machine's own zone."""
    from datetime import datetime
    from zoneinfo import ZoneInfo
    zone = ZoneInfo(zone_name)
    return lambda t: datetime.fromtimestamp(t, zone).utcoffset().total_seconds()


def slots_sent(zone_name: str, interval_s: float, first_day: str, days: int) -> list[tuple[str, str, float]]:
    """The intervals a camera sends from local midnight of `first_day` on, ticking every 20 s: (start and end on the
    local clock, hours)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo
    zone = ZoneInfo(zone_name)
    start = datetime.fromisoformat(first_day).replace(tzinfo=zone).timestamp()
    counter = AgeBandCounter("till-1", [18], interval_s, k=1, utc_offset_s=zone_offset(zone_name), joined=False)
    local = lambda t: datetime.fromtimestamp(t, zone).strftime("%m-%d %H:%M %Z")  # noqa: E731
    sent = []
    for tick in range(int(days * 86_400 / 20) + 1):
        now = start + tick * 20
        counter.open(now)
        if counter.due(now):
            sent.append(counter.flush(now))
    assert all(not m["partial"] for m in sent)
    assert all(a["interval_end"] == b["interval_start"] for a, b in zip(sent, sent[1:])), "a gap or an overlap"
    assert sent[0]["interval_start"] == start
    return [(local(m["interval_start"]), local(m["interval_end"]), (m["interval_end"] - m["interval_start"]) / 3600)
            for m in sent]


@pytest.mark.parametrize("zone_name, spring, autumn", [("Europe/London", "2026-03-28", "2026-10-24"),
                                                       ("America/New_York", "2026-03-07", "2026-10-31")])
def test_daily_intervals_across_summer_time_changes_run_midnight_to_midnight_and_tile(zone_name, spring, autumn):
    """A daily slot ended 24 hours after its start while the next began at local midnight: in London's autumn
    10-25 00:00 BST -> 10-25 23:00 GMT, then 10-25 01:00 BST -> 10-26 00:00 GMT, overlapping by 22 hours (2026
    review). The day of a change is 23 or 25 hours long."""
    for first_day, change_hours in ((spring, 23.0), (autumn, 25.0)):
        sent = slots_sent(zone_name, 86_400, first_day, days=4)[:3]
        assert [hours for _, _, hours in sent] == [24.0, change_hours, 24.0], sent
        assert all(start[6:11] == end[6:11] == "00:00" for start, end, _ in sent), sent


def test_hourly_and_shorter_intervals_across_summer_time_changes_tile():
    """Where the clock goes back, the slot whose end the first pass read runs on to the end of the second; where
    it jumps ahead, the local times skipped have no slot. Lord Howe Island moves its clock by 30 minutes."""
    def lengths(zone_name, interval_s, first_day):
        return sorted({hours for _, _, hours in slots_sent(zone_name, interval_s, first_day, days=2)})

    assert lengths("Europe/London", 3600, "2026-10-25") == [1.0, 2.0]  # 01:00 BST -> 02:00 GMT
    assert lengths("Europe/London", 3600, "2026-03-29") == [1.0]  # the clock never reads 01:00-02:00
    assert lengths("Europe/London", 900, "2026-10-25") == [0.25, 1.25]  # 01:45 BST -> 02:00 GMT
    assert lengths("America/New_York", 7200, "2026-11-01") == [2.0, 3.0]
    assert lengths("America/New_York", 7200, "2026-03-08") == [1.0, 2.0]  # 02:00-04:00 begins at 03:00
    assert lengths("Australia/Lord_Howe", 3600, "2026-04-05") == [1.0, 1.5]  # 02:00 back to 01:30
    assert lengths("Australia/Lord_Howe", 3600, "2026-10-04") == [0.5, 1.0]  # 02:00 on to 02:30
    assert lengths("Australia/Lord_Howe", 900, "2026-10-04") == [0.25]


def test_band_edges_must_increase():
    with pytest.raises(ConfigError) as caught:
        parse_config({"store_id": "s", "cameras": [{"id": "c", "source": 0}], "analytics": {"bands": [25, 18]}})
    assert caught.value.problems == ["analytics.bands: band edges must increase, e.g. [18, 25, 35]"]


def test_a_replay_publishes_the_interval_counts(tmp_path, broker, subscriber, age_models, hamilton_clip):
    clear_of_a_day_boundary()  # the replay's clock starts at now: an hourly interval could end inside the clip
    config = write_config(tmp_path / "c.toml", store_id="store-1", daemon_id="d", cameras=[{"id": "c", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port}, models={"age_model": str(age_models[40])},
                          analytics={"interval_s": 86_400, "k": 2})
    result = tillsight("replay", str(hamilton_clip), "--config", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert subscriber.wait_for(lambda s: s.json("replay/analytics"))
    counts = subscriber.json("replay/analytics")
    assert len(counts) == 1 and counts[0]["partial"] is True  # the replay ended inside the day
    bands = counts[0]["bands"]
    assert list(bands) == ["0-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+"]
    assert bands["35-44"] == summary["tracks"] >= 2  # every customer answered 40
    assert all(v == 0 for k, v in bands.items() if k != "35-44")  # nobody in them: 0 points at nobody
    assert set(counts[0]) == {"id", "schema", "store", "camera", "interval_start", "interval_end", "bands", "k", "partial",
                              "camera_fault_s", "store_closed_s"}
    assert counts[0]["camera_fault_s"] == counts[0]["store_closed_s"] == 0.0  # a replay's store is open


def test_the_interval_in_progress_is_kept_on_disk_and_sent_as_partial_by_the_next_run(tmp_path, caplog):
    """A daemon killed outright sends no partial interval: the next start sends what the file kept, once."""
    path = tmp_path / "outbox.sqlite3.analytics.json"
    counter = AgeBandCounter("till-1", [18, 25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0)
    kept = OpenIntervals(path)
    counter.add(40, now=1000.0)  # counting began at 1000 s (a start part way into the 900-1800 slot)
    kept.save("till-1", counter.state(1000.0))
    counter.fault_s, counter.closed_s = 3.0, 2.0
    kept.save("till-1", counter.state(1005.0))  # nothing counted since, within SAVE_EVERY_S: not written
    assert json.loads(path.read_text())["till-1"]["saved_at"] == 1000.0
    counter.add(16, now=1006.0)
    kept.save("till-1", counter.state(1006.0))  # a count: written at once
    def crash(message):
        raise KeyboardInterrupt  # the daemon killed before its outbox had the message

    with pytest.raises(KeyboardInterrupt):
        OpenIntervals(path).take_left(max_age_s=86400, now=2000.0, send=crash)
    sent = []
    [message] = OpenIntervals(path).take_left(max_age_s=86400, now=2000.0, send=sent.append)  # still there
    assert sent == [message]
    assert message == {"camera": "till-1", "interval_start": 1000.0, "interval_end": 1006.0,
                       "bands": {"0-17": 1, "18-24": 0, "25+": 1}, "k": 1, "partial": True, "camera_fault_s": 3.0,
                       "store_closed_s": 2.0, "opening": counter.opening}  # kept on disk with it
    assert not path.exists() and OpenIntervals(path).take_left(86400) == []  # sent once
    before_closed_s = counter.state(1006.0)
    del before_closed_s["closed_s"]  # kept by a daemon from before store_closed_s, read by its upgrade
    path.write_text(json.dumps({"till-1": before_closed_s}))
    [message] = OpenIntervals(path).take_left(max_age_s=86400, now=2000.0)
    assert (message["bands"], message["store_closed_s"]) == ({"0-17": 1, "18-24": 0, "25+": 1}, 0.0)

    kept.save("till-1", counter.state(1010.0))
    kept.save("till-1", None)  # a clean stop sent the interval itself
    assert OpenIntervals(path).take_left(86400, now=2000.0) == []
    kept.save("till-1", counter.state(1010.0))
    assert OpenIntervals(path).take_left(max_age_s=3600, now=1010.0 + 3601) == []  # too old, as the outbox drops
    path.write_text("{not json")
    assert OpenIntervals(path).take_left(86400) == [] and not path.exists()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "analytics intervals left by the previous run are too old: not sent",
        "analytics intervals left by the previous run are unreadable: not sent"]


def test_an_interval_sent_again_after_a_crash_carries_the_same_id(tmp_path):
    """A daemon killed after its outbox took the intervals the previous run left, before their file was removed,
    sends them again at the next start: under one id, which a consumer drops as a repeat (at least once, README).
    They had a fresh random id each time, so HQ counted those customers twice."""
    from edge.config import MqttConfig
    from edge.outbox import Outbox
    from edge.publish import Publisher
    path = tmp_path / "outbox.sqlite3.analytics.json"
    counter = AgeBandCounter("till-1", [18, 25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0)
    counter.add(40, now=1000.0)
    OpenIntervals(path).save("till-1", counter.state(1000.0))
    left = path.read_text()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=1), "store-1", "till-pc", outbox)  # never connected
    OpenIntervals(path).take_left(max_age_s=86400, now=2000.0, send=publisher.publish_analytics)
    path.write_text(left)  # as the kill left it: the file not yet removed
    OpenIntervals(path).take_left(max_age_s=86400, now=2000.0, send=publisher.publish_analytics)
    counter.add(30, now=1001.0)
    publisher.publish_analytics(counter.flush(1002.0, partial=True))  # another interval: another id
    ids = [json.loads(row.payload)["id"] for row in outbox.backlog()]
    outbox.close()
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2], ids


def test_a_slot_counted_again_after_the_clock_stepped_back_is_another_interval_with_another_id(tmp_path):
    """The wall clock stepped back 30 minutes (NTP fixing a clock that ran ahead): the whole 00:15-00:30 slot is
    counted again, over other customers. Its id was the slot's times alone, so a consumer dropping repeated ids
    dropped the second count (2026-11-27 review). Now each opening of an interval has an id of its own."""
    from edge.config import MqttConfig
    from edge.outbox import Outbox
    from edge.publish import Publisher
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = Publisher(MqttConfig(host="127.0.0.1", port=1), "store-1", "till-pc", outbox)  # never connected
    counter = AgeBandCounter("till-1", [18, 25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0)
    for first_pass, age in ((True, 16.0), (False, 40.0)):
        if not first_pass:  # the step back: the pipeline sends the interval so far as partial, then counts afresh
            counter.open(1800.1)
            counter.flush(1800.1, partial=True)
        counter.open(900.0)  # 00:15 (after the step back, the slot begins again)
        counter.add(age, 1200.0)
        publisher.publish_analytics(counter.flush(1800.0))  # 00:30: the whole slot, twice
    bodies = [json.loads(row.payload) for row in outbox.backlog()]
    outbox.close()
    assert [(b["interval_start"], b["interval_end"], b["partial"]) for b in bodies] == \
        [("1970-01-01T00:15:00.000Z", "1970-01-01T00:30:00.000Z", False)] * 2
    assert [b["bands"] for b in bodies] == [{"0-17": 1, "18-24": 0, "25+": 0}, {"0-17": 0, "18-24": 0, "25+": 1}]
    assert bodies[0]["id"] != bodies[1]["id"] and all("opening" not in b for b in bodies)


def test_an_interval_that_cannot_be_saved_is_one_warning_and_counting_goes_on(tmp_path, caplog):
    counter = AgeBandCounter("till-1", [18], interval_s=900, k=1)
    kept = OpenIntervals(tmp_path / "gone" / "outbox.sqlite3.analytics.json")  # its folder does not exist
    for age in (20, 30, 40):
        counter.add(age, now=1000.0)
        kept.save("till-1", counter.state(1000.0))
    assert [r.getMessage() for r in caplog.records] == [
        "analytics intervals in progress cannot be saved: a crash now would lose their counts"]
    assert counter.flush(1800.0)["bands"] == {"0-17": 0, "18+": 3}


def test_a_cameras_save_does_not_wait_for_another_cameras_write_and_is_written_after_it(tmp_path, monkeypatch):
    """The intervals file is written with two fsyncs: under the lock every camera's frame takes, a slow disk held
    every camera up (issue 10). One camera writes; another that changes its interval meanwhile goes on at once,
    and the writer writes again for it, so the file ends with both."""
    import threading
    import time

    path = tmp_path / "outbox.sqlite3.analytics.json"
    intervals = OpenIntervals(path)
    writing, real_write = threading.Event(), OpenIntervals._write

    def slow_write(self, text):
        writing.set()
        time.sleep(0.5)  # a slow disk's fsyncs
        return real_write(self, text)

    monkeypatch.setattr(OpenIntervals, "_write", slow_write)
    first = AgeBandCounter("till-1", [18, 25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0)
    second = AgeBandCounter("till-2", [18, 25], interval_s=900, k=1, utc_offset_s=lambda t: 0.0)
    first.add(40, now=1000.0)
    second.add(20, now=1000.0)
    writer = threading.Thread(target=intervals.save, args=("till-1", first.state(1000.0)))
    writer.start()
    assert writing.wait(5)
    started = time.monotonic()
    intervals.save("till-2", second.state(1000.0))
    assert time.monotonic() - started < 0.2  # did not wait for till-1's write
    writer.join()
    assert set(json.loads(path.read_text())) == {"till-1", "till-2"}  # written again, for till-2
