"""Recorded video through the real daemon code, against a real mosquitto."""

import contextlib
import json
import re
import os
import signal
import sqlite3
import subprocess
import sys
import time

import onnxruntime as ort
import pytest

from edge import __version__
from edge.broker import LocalBroker, free_port
from edge.service import run_replay
from edge.config import parse_config
from tskit import REPO, Subscriber, tillsight, write_config

ESTIMATE_KEYS = {"id": str, "schema": int, "store": str, "camera": str, "track": int, "age": float, "spread": float,
                 "samples": int, "final": bool, "first_seen": str, "last_seen": str, "face": dict,
                 "frame_time": str, "transaction": (str, type(None))}
ALERT_KEYS = {"id": str, "schema": int, "store": str, "camera": str, "track": int, "alert": str, "challenge_age": float,
              "mode": str, "risk": (float, type(None)),
              "age": float, "spread": float, "samples": int, "time": str, "frame_time": str,
              "transaction": (str, type(None))}


def assert_schema(body: dict, keys: dict) -> None:
    assert set(body) == set(keys), body
    for key, kind in keys.items():
        assert isinstance(body[key], (int, float) if kind is float else kind), (key, body)
    assert body["schema"] == 1


def replay_config(tmp_path, port, age_model, **extra):
    return write_config(tmp_path / "replay.toml", store_id="store-1", daemon_id="till-pc",
                        cameras=[{"id": "unused", "source": 0}],
                        mqtt={"host": "127.0.0.1", "port": port},
                        models={"age_model": str(age_model)}, logging={"level": "warning"}, **extra)


def replay(video, config, *more):
    result = tillsight("replay", str(video), "--config", str(config), *more)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("clip, min_share", [("hamilton_clip", 0.85), ("carphone_clip", 0.99)])
def test_replay_publishes_documented_estimates_and_no_alert_for_adults(
        request, clip, min_share, tmp_path, broker, subscriber, age_models):
    video = request.getfixturevalue(clip)
    summary = replay(video, replay_config(tmp_path, broker.port, age_models[40]))
    print(clip, summary)
    assert summary["frames"] == {"hamilton_clip": 275, "carphone_clip": 120}[clip]
    assert summary["frames_with_faces"] >= min_share * summary["frames"]
    assert summary["tracks"] >= 1 and summary["alerts"] == 0
    assert subscriber.wait_for(lambda s: any(b["final"] for b in s.json("/estimate")))
    estimates = subscriber.json("store-1/replay/estimate")
    assert len(estimates) == summary["estimates"]
    for body in estimates:
        assert_schema(body, ESTIMATE_KEYS)
        assert body["age"] == 40.0 and body["camera"] == "replay"
    assert len([b for b in estimates if b["final"]]) == summary["tracks"]
    statuses = subscriber.json("store-1/till-pc/status")
    assert statuses[0]["state"] == "online" and statuses[-1]["state"] == "offline"
    assert statuses[-1]["cameras"]["replay"]["state"] == "ended"
    assert statuses[0]["age_model"] == {"tier": "file", "file": "age40.onnx", "variant": "fp32",
                                        "provider": "CPUExecutionProvider", "kind": "constant 40 (test/demo placeholder)"}
    # the CPU build here: the default "cuda" is said, and no problem (README, "CPU or GPU")
    assert statuses[0]["provider_fallback"] == summary["provider_fallback"]
    assert summary["provider_fallback"].startswith("cuda not in this build: ")
    assert subscriber.json("/alert") == []
    assert all(b"jpg" not in p and len(p) < 2000 for _, p, _ in subscriber.messages)  # no image data


def test_a_minor_raises_one_alert_per_track(tmp_path, broker, subscriber, age_models, hamilton_clip):
    summary = replay(hamilton_clip, replay_config(tmp_path, broker.port, age_models[16]))
    assert summary["tracks"] >= 1 and summary["alerts"] == summary["tracks"]
    assert subscriber.wait_for(lambda s: len(s.json("/alert")) == summary["alerts"])
    alerts = subscriber.json("/alert")
    for body in alerts:
        assert_schema(body, ALERT_KEYS)
        assert body["alert"] == "age_check" and body["age"] == 16.0 and body["challenge_age"] == 25
    assert len({b["track"] for b in alerts}) == len(alerts)  # one per track
    alert_qos = [m for m in subscriber.messages if m[0].endswith("/alert")]
    assert len(alert_qos) == len(alerts)


def test_daemon_goes_online_and_the_broker_publishes_its_will_after_kill_9(
        tmp_path, broker, subscriber, age_models, carphone_clip):
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc",
                          cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
                          models={"age_model": str(age_models[40])})
    daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert subscriber.wait_for(lambda s: any(b["state"] == "online" for b in s.json("till-pc/status")), 30)
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) >= 1, 30)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1]["state"] == "offline", 15)
        will = [(t, p, r) for t, p, r in subscriber.messages if t.endswith("till-pc/status")][-1]
        instance = subscriber.json("till-pc/status")[0]["instance"]  # the process's, in every status (peers.py)
        assert json.loads(will[1]) == {"schema": 1, "store": "store-1", "daemon": "till-pc", "instance": instance,
                                       "state": "offline", "version": __version__}
    finally:
        daemon.kill()
        daemon.wait()
    # retained: a POS that connects later still learns the daemon is offline
    late = Subscriber(broker.port, "tillsight/store-1/till-pc/status")
    assert late.wait_for(lambda s: s.messages and s.messages[-1][2], 5)
    assert json.loads(late.messages[-1][1])["state"] == "offline"
    late.close()


def test_daemon_started_before_the_broker_delivers_once_it_is_up(tmp_path, age_models, carphone_clip):
    port = free_port()
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc",
                          cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": port},
                          models={"age_model": str(age_models[40])})
    daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # the daemon runs, tracks and queues with no broker
        assert daemon.poll() is None
        with LocalBroker(port=port) as broker:
            sub = Subscriber(broker.port)
            assert sub.wait_for(lambda s: len(s.json("till-1/estimate")) >= 2, 40)
            assert sub.wait_for(lambda s: any(b["state"] == "online" for b in s.json("till-pc/status")), 10)
            sub.close()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0, daemon.stderr.read()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            # the detector and the age model both found CUDA missing from the CPU build: said once, at info
            said = [json.loads(line) for line in daemon.stderr.read().splitlines() if "cuda not in this build" in line]
            assert [line["level"] for line in said] == ["info"]
    finally:
        daemon.kill()
        daemon.wait()


def test_replay_with_no_broker_fails_in_one_line_instead_of_losing_messages(tmp_path, age_models, carphone_clip):
    port = free_port()
    result = tillsight("replay", str(carphone_clip), "--config",
                       str(replay_config(tmp_path, port, age_models[40])), "--ack-timeout", "2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("tillsight: error: ") and f"MQTT broker at 127.0.0.1:{port}: connection refused" in lines[0] \
        and "messages not acknowledged" in lines[0]


def test_replay_to_a_broker_host_not_found_names_mqtt_host(tmp_path, age_models, carphone_clip):
    """status and pos named the setting to fix for a host not found; run and replay did not."""
    config = write_config(tmp_path / "replay.toml", store_id="store-1", daemon_id="till-pc",
                          cameras=[{"id": "unused", "source": 0}], mqtt={"host": "no-such-broker.invalid", "port": 9},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    result = tillsight("replay", str(carphone_clip), "--config", str(config), "--ack-timeout", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"tillsight: error: MQTT broker at no-such-broker\.invalid:9: host name not found \(.*\) "
                        r"\(check mqtt\.host\); \d+ messages not acknowledged within 1 s",
                        result.stderr.strip().splitlines()[-1]), result.stderr


def test_replay_with_no_broker_and_an_outbox_file_waits_and_fails_saying_what_it_kept(tmp_path, age_models,
                                                                                        carphone_clip):
    """With `[outbox] path` it exited 0 after 0.5 s, the --ack-timeout cut short: the daemon's stop, to which a
    message on disk is safe. A replay promises every message acknowledged."""
    from edge.outbox import Outbox
    port, outbox = free_port(), tmp_path / "outbox.sqlite3"
    config = replay_config(tmp_path, port, age_models[40], outbox={"path": str(outbox)})
    started = time.monotonic()
    result = tillsight("replay", str(carphone_clip), "--config", str(config), "--ack-timeout", "2")
    assert time.monotonic() - started > 2  # the timeout waited in full
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    said = re.fullmatch(rf"tillsight: error: MQTT broker at 127.0.0.1:{port}: connection refused .*; (\d+) messages "
                        rf"not acknowledged within 2 s \((\d+) kept in the outbox {re.escape(str(outbox))} for the "
                        r"next start\)", lines[0])
    assert said and int(said[1]) == int(said[2]) > 0, lines[0]
    assert Outbox(outbox).depth() == int(said[2])


def _interrupt_replay(config, clip, ack_timeout: int, playing) -> tuple[subprocess.CompletedProcess, float]:
    """Ctrl-C once `playing()` says the replay publishes (its models loaded: the 9 s clip plays at its own pace)."""
    replay = subprocess.Popen([sys.executable, "-m", "edge", "replay", str(clip), "--config", str(config), "--realtime",
                               "--ack-timeout", str(ack_timeout)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not playing() and time.monotonic() < deadline and replay.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)
        assert replay.poll() is None, replay.stderr.read()
        replay.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, err = replay.communicate(timeout=ack_timeout + 30)
        return subprocess.CompletedProcess(replay.args, replay.returncode, out, err), time.monotonic() - started
    finally:
        replay.kill()
        replay.wait()


def test_ctrl_c_in_a_replay_with_an_outbox_stops_at_once_saying_what_it_kept(tmp_path, age_models, hamilton_clip):
    """It waited the whole --ack-timeout for a broker that was away, then exited 130 in silence, though every
    message was safe on disk for the next start."""
    from edge.outbox import Outbox
    port, outbox = free_port(), tmp_path / "outbox.sqlite3"
    config = replay_config(tmp_path, port, age_models[40], outbox={"path": str(outbox)})

    def queued() -> bool:  # the status it starts with, at least, kept on disk (a reader beside the writer: WAL)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
                return db.execute("SELECT count(*) FROM outbox").fetchone()[0] > 0
        except sqlite3.Error:
            return False

    result, stop_s = _interrupt_replay(config, hamilton_clip, ack_timeout=120, playing=queued)
    assert result.returncode == 130, result.stderr
    assert stop_s < 60  # THREADS_STOP_S and the half second the outbox's stop waits, not the 120 s
    last = result.stderr.strip().splitlines()[-1]
    said = re.fullmatch(rf"tillsight: error: interrupted: (\d+) messages kept in the outbox {re.escape(str(outbox))} "
                        r"for the next start", last)
    assert said and int(said[1]) > 0 and "Traceback" not in result.stderr, result.stderr
    assert Outbox(outbox).depth() == int(said[1])


def test_ctrl_c_in_a_replay_with_its_broker_up_says_everything_was_acknowledged(tmp_path, broker, age_models,
                                                                                   hamilton_clip):
    config = replay_config(tmp_path, broker.port, age_models[40])
    status = Subscriber(broker.port, "tillsight/store-1/+/status")
    try:
        result, _ = _interrupt_replay(config, hamilton_clip, ack_timeout=30,
                                      playing=lambda: any(m["state"] == "online" for m in status.json("/status")))
    finally:
        status.close()
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "tillsight: error: interrupted: every message published so far was acknowledged"


def test_corrupt_video_is_one_line(tmp_path, broker, age_models):
    video = tmp_path / "broken.mp4"
    video.write_bytes(os.urandom(4096))
    result = tillsight("replay", str(video), "--config", str(replay_config(tmp_path, broker.port, age_models[40])))
    assert result.returncode == 1
    assert result.stderr.strip() == f"tillsight: error: camera replay: cannot open source '{video}'"


def test_two_tills_share_batched_age_calls(broker, subscriber, age_models, carphone_clip):
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc",
                           "cameras": [{"id": "till-1", "source": str(carphone_clip), "fps_limit": None},
                                       {"id": "till-2", "source": str(carphone_clip), "fps_limit": None}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port},
                           "models": {"age_model": str(age_models[40]), "max_wait_ms": 50}})
    summary = run_replay(config)
    assert summary["frames"] == 240 and summary["faces"] == 240
    # one session call served both tills most of the time: far fewer calls than frames
    assert summary["batches"] < 0.75 * summary["frames"]
    assert subscriber.wait_for(lambda s: {b["camera"] for b in s.json("/estimate") if b["final"]} == {"till-1", "till-2"})


def test_the_cameras_detect_faces_at_the_same_time(monkeypatch, broker, age_models, carphone_clip):
    """One detector session serves every camera without a lock, so on a store server's cores they detect in
    parallel (behind one lock, a core's ~200 frames/s for all: benchmarks/detector_threads.py). The two cameras'
    first calls must be inside the detector at once, else the barrier breaks and so does the replay."""
    import itertools
    import threading

    from edge.detect import FaceDetector
    inside, calls, detect = threading.Barrier(2, timeout=10), itertools.count(), FaceDetector.__call__

    def meet_then_detect(self, image):
        if next(calls) < 2:
            inside.wait()
        return detect(self, image)

    monkeypatch.setattr(FaceDetector, "__call__", meet_then_detect)
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc",
                           "cameras": [{"id": "till-1", "source": str(carphone_clip), "fps_limit": None},
                                       {"id": "till-2", "source": str(carphone_clip), "fps_limit": None}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port},
                           "models": {"age_model": str(age_models[40])}})
    summary = run_replay(config)
    assert summary["frames"] == summary["faces"] == 240 and not inside.broken


def test_each_face_is_looked_at_once_a_frame(monkeypatch, broker, age_models, carphone_clip):
    """The picture check and the tracker compare the same signature of a face: made once, not once each (the
    aligned crop, two colour conversions and a histogram, in the camera's Python thread)."""
    from edge.track import Signature
    made, real = [], Signature.of
    monkeypatch.setattr(Signature, "of", staticmethod(lambda image, face: made.append(face) or real(image, face)))
    config = parse_config({"store_id": "store-1", "cameras": [{"id": "till-1", "source": str(carphone_clip),
                                                                "fps_limit": None}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port},
                           "models": {"age_model": str(age_models[40])}})
    summary = run_replay(config)
    assert summary["faces"] == 120 and len(made) == 120 and summary["tracks"] == 1


def test_a_network_camera_that_vanishes_is_reconnected(tmp_path, broker, subscriber, age_models, carphone_clip):
    """... and its password, in its URL as IP cameras take it, is in no message and no log line."""
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip).start()
    source = camera.url.replace("http://", "http://viewer:hunter2@") + "?user=viewer&pwd=hunter2"
    # status every 30 s: what arrives sooner was sent because the camera changed state
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=30,
                          cameras=[{"id": "till-1", "source": source, "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, tracking={"lost_after_s": 0.5})
    daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def camera_state(s):
        statuses = s.json("till-pc/status")
        return statuses[-1]["cameras"]["till-1"] if statuses else {}

    try:
        assert subscriber.wait_for(lambda s: camera_state(s).get("state") == "online", 30)
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) >= 1, 30)
        camera.stop()  # the camera vanishes mid-stream
        vanished = time.monotonic()
        assert subscriber.wait_for(lambda s: camera_state(s).get("state") == "reconnecting", 30)
        assert time.monotonic() - vanished < 15  # OpenCV's read timeout (5 s), then the status at once
        lost = subscriber.json("till-pc/status")[-1]
        assert lost["state"] == "degraded" and any("camera till-1 reconnecting" in p for p in lost["problems"])
        assert subscriber.wait_for(lambda s: any(b["final"] for b in s.json("till-1/estimate")), 10)
        assert daemon.poll() is None  # the daemon lives on
        before = len(subscriber.json("till-1/estimate"))
        camera.start()  # back on the same address
        assert subscriber.wait_for(lambda s: camera_state(s).get("state") == "online", 40)
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) > before, 30)
        assert camera_state(subscriber)["reconnects"] >= 1
        back = subscriber.json("till-pc/status")[-1]
        assert back["state"] == "online" and back["problems"] == [] and back["cameras"]["till-1"]["last_error"] is None
        from edge.config import stream_fingerprint  # for another daemon to find the same stream under another id
        assert back["cameras"]["till-1"]["stream"] == stream_fingerprint(source) == stream_fingerprint(camera.url)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, daemon.stderr.read()
        shown = f"http://viewer:***@127.0.0.1:{camera.port}/video.mjpg?user=viewer&pwd=***"
        assert any(shown in p for p in lost["problems"]), lost["problems"]
        assert not [p for _, p, _ in subscriber.messages if b"hunter2" in p]
        assert "hunter2" not in daemon.stderr.read()
    finally:
        daemon.kill()
        daemon.wait()
        if camera.running.is_set():
            camera.stop()


def test_a_wall_clock_never_set_is_a_problem_until_it_is(age_models, carphone_clip):
    """A till PC with a dead clock battery boots into 2000 until NTP sets it: every message's time and analytics
    interval would be wrong, so the status says degraded, with why."""
    from edge.service import Service
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc",
                           "cameras": [{"id": "till-1", "source": str(carphone_clip)}],
                           "models": {"age_model": str(age_models[40])}})
    service = Service(config)
    assert service.problems() == []
    service.clock = lambda: 946684800.0  # 2000-01-01
    assert service.problems() == ["wall clock reads 2000-01-01T00:00:00.000Z: never set (no NTP, or a dead clock "
                                  "battery); message times and analytics intervals are wrong until it is"]
    assert service.status()["state"] == "degraded"
    service.clock = lambda: 1767225600.0  # 2026-01-01: set
    assert service.problems() == []


NIGHT, MORNING = 1795734000.0, 1795764600.0  # Thu 2026-11-26 23:00 and Fri 07:30 in London (UTC in winter)


@contextlib.contextmanager
def store_at_night(camera, broker, age_model, camera_settings: dict, **settings):
    """A daemon in this process for one MJPEG camera at a store open 07:00-22:00 in London (unless `settings` give
    other hours), its clocks (the service's, the camera's frames', the pipeline's) at NIGHT and running. Yields
    the service and `set_clock(unix_time)`, which moves them all. Stops the daemon, and the camera, after."""
    import threading

    from edge.service import Service
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc", "status_interval_s": 30,
                           "cameras": [{"id": "till-1", "source": camera.url, "fps_limit": 10, **camera_settings}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port}, "models": {"age_model": str(age_model)},
                           "opening_hours": {"timezone": "Europe/London", "default": "07:00-22:00"}, **settings})
    service = Service(config)
    offset = [NIGHT - time.time()]

    def store_clock() -> float:
        return time.time() + offset[0]

    def set_clock(when: float) -> None:
        offset[0] = when - time.time()

    service.clock = store_clock
    for reader, pipeline in zip(service.readers, service.pipelines):
        reader.clock = pipeline.clock = store_clock
    done = threading.Event()
    service.start()
    loop = threading.Thread(target=service.run_until_stopped, args=(done,))
    loop.start()
    try:
        yield service, set_clock
    finally:
        done.set()
        loop.join()
        service.stop(5)
        if camera.running.is_set():
            camera.stop()


def test_a_store_closed_for_the_night_is_quiet_about_its_dark_camera_until_it_opens(broker, subscriber, age_models,
                                                                                    carphone_clip, caplog):
    """The lights go off after closing and the till camera shows nothing: with opening hours that is no problem
    (online, no warning) while the store is closed, and one the moment it opens still dark. A camera that does
    not connect is a problem at any hour. Checks are answered camera_fault either way."""
    import logging

    import cv2
    import numpy as np

    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=10).start()
    rng = np.random.default_rng(0)
    camera.jpegs = [cv2.imencode(".jpg", np.clip(rng.normal(5, 3, (144, 176, 3)), 0, 255).astype(np.uint8))[1]
                    .tobytes() for _ in range(20)]  # a dark store: sensor noise, nothing to see
    caplog.set_level(logging.INFO)
    hours = {"timezone": "Europe/London", "default": "07:00-22:00", "sun": "closed"}
    with store_at_night(camera, broker, age_models[40], {"picture_check_s": 1},
                        opening_hours=hours) as (service, set_clock):
        assert subscriber.wait_for(lambda s: any(m["cameras"]["till-1"]["picture"] == "blank"
                                                 for m in s.json("till-pc/status") if "cameras" in m), 30)
        night_status = service.status()
        night_fault = service.camera_fault("till-1")
        night_summary = service.summary()
        set_clock(MORNING)
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1].get("store_open") is True, 5)
        morning_status = subscriber.json("till-pc/status")[-1]
        set_clock(NIGHT + 86400)  # the next night
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1].get("store_open") is False, 5)
        camera.stop()  # unplugged at night
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1]["cameras"]["till-1"]["state"]
                                   == "reconnecting", 20)
        unplugged = subscriber.json("till-pc/status")[-1]
    fault = "picture blank: no detail for 1 s or more (lens covered, camera turned away, no signal)"
    assert (night_status["state"], night_status["problems"], night_status["store_open"]) == ("online", [], False)
    assert night_status["cameras"]["till-1"]["picture"] == "blank" and night_fault == fault
    assert "degraded" not in night_summary
    assert (morning_status["state"], morning_status["problems"]) == ("degraded", [f"camera till-1 {fault}"])
    assert unplugged["state"] == "degraded" and unplugged["store_open"] is False
    assert unplugged["problems"][0].startswith("camera till-1 reconnecting: "), unplugged["problems"]
    lines = [(r.getMessage(), r.levelname) for r in caplog.records if r.name.startswith("edge.")]
    assert ("camera picture blank", "INFO") in lines and ("camera picture blank", "WARNING") not in lines
    assert lines.index(("store open", "INFO")) < [m for m, _ in lines].index("degraded")


def test_a_camera_powered_down_with_the_lanes_at_night_is_no_problem_until_the_store_opens(broker, subscriber,
                                                                                            age_models, carphone_clip,
                                                                                            caplog):
    """`off_while_closed`: a store server whose till cameras are switched off with the lanes after closing stays
    online all night, the outage logged at info; at opening time a camera still off is a problem at once, and
    fine again when it comes up. A camera without the setting is a problem at any hour (the night test above)."""
    import logging

    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=10).start()
    caplog.set_level(logging.INFO)

    def camera_state(state: str):
        return lambda s: [m for m in s.json("till-pc/status") if "cameras" in m][-1:] and \
            s.json("till-pc/status")[-1]["cameras"]["till-1"]["state"] == state

    with store_at_night(camera, broker, age_models[40], {"off_while_closed": True}) as (service, set_clock):
        assert subscriber.wait_for(camera_state("online"), 20)
        camera.stop()  # the lanes' power goes off
        assert subscriber.wait_for(camera_state("reconnecting"), 20)
        night = subscriber.json("till-pc/status")[-1]
        night_fault = service.camera_fault("till-1")
        set_clock(MORNING)  # open, and the camera still off
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1].get("store_open") is True, 5)
        morning = subscriber.json("till-pc/status")[-1]
        camera.start()
        assert subscriber.wait_for(camera_state("online"), 40)  # within the reconnect backoff
        back = subscriber.json("till-pc/status")[-1]
    assert (night["state"], night["problems"], night["store_open"]) == ("online", [], False)
    assert night_fault.startswith("reconnecting: ")  # an age check is still answered camera_fault
    assert morning["state"] == "degraded" and morning["problems"][0].startswith("camera till-1 reconnecting: ")
    assert (back["state"], back["problems"]) == ("online", [])
    lines = [(r.getMessage(), r.levelname) for r in caplog.records if r.name.startswith("edge.")]
    assert ("camera reconnecting", "INFO") in lines and ("camera reconnecting", "WARNING") not in lines
    assert lines.index(("store open", "INFO")) < [m for m, _ in lines].index("degraded")


def test_faces_seen_while_the_store_is_closed_are_staff_not_customers_in_the_analytics(broker, subscriber, age_models,
                                                                                      carphone_clip):
    """The cleaner at 23:00 gets an estimate like anyone (the till is the same), but is no customer: the intervals
    count nobody and say how long the store was closed, not that the camera could not see. Open, the same face
    is counted."""
    import cv2
    import numpy as np

    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=10).start()
    someone = camera.jpegs
    rng = np.random.default_rng(0)
    nobody = [cv2.imencode(".jpg", np.clip(rng.normal(90, 30, (144, 176, 3)), 0, 255).astype(np.uint8))[1].tobytes()
              for _ in range(10)]  # an empty till: detail enough to be a live picture, no face
    def after_opening(interval: dict) -> bool:  # wholly: from the first interval that starts after it
        from datetime import datetime
        start = datetime.fromisoformat(interval["interval_start"].replace("Z", "+00:00")).timestamp()
        return start >= MORNING + 1

    def visit(after: int) -> int:
        """Someone stands at the till, then leaves: the count of final estimates once they are found gone."""
        camera.jpegs = someone
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) > after, 20)
        camera.jpegs = nobody
        assert subscriber.wait_for(lambda s: any(m["final"] for m in s.json("till-1/estimate")[after:]), 20)
        return len(subscriber.json("till-1/estimate"))

    with store_at_night(camera, broker, age_models[40], {}, analytics={"interval_s": 1, "k": 1}) as (_, set_clock):
        seen_at_night = visit(0)
        night_intervals = len(subscriber.json("till-1/analytics"))
        assert subscriber.wait_for(lambda s: len(s.json("till-1/analytics")) >= night_intervals + 2, 10)
        night = subscriber.json("till-1/analytics")
        set_clock(MORNING)  # open
        visit(seen_at_night)
        assert subscriber.wait_for(lambda s: any(sum(v or 0 for v in m["bands"].values())
                                                 for m in s.json("till-1/analytics") if after_opening(m)), 10)
    finals = [m for m in subscriber.json("till-1/estimate") if m["final"]]
    assert len(finals) >= 2 and all(m["age"] == 40.0 for m in finals)
    assert all(v == 0 for m in night for v in m["bands"].values()), [m["bands"] for m in night]
    assert all(m["camera_fault_s"] == 0.0 for m in night)
    whole = [m for m in night[1:] if not m["partial"]]  # the first one started with the daemon
    assert whole and all(0.5 <= m["store_closed_s"] <= 1.5 for m in whole), [m["store_closed_s"] for m in night]
    day = [m for m in subscriber.json("till-1/analytics") if after_opening(m)]
    assert sum(m["bands"]["35-44"] for m in day) >= 1 and all(m["store_closed_s"] == 0.0 for m in day)


def test_a_customer_at_the_till_across_opening_or_closing_time_counts_as_the_store_was_when_they_left(
        broker, subscriber, age_models, carphone_clip):
    """Open or closed is judged when the person was last at the till: someone there from 06:59:52 to after 07:00
    is a customer (the first one of the day), someone there from 21:59:52 to after 22:00 is not (staff closing
    up, or a customer let out late: either way not a customer the store had while open)."""
    import cv2
    import numpy as np

    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=10).start()
    # forward and back: the camera plays its frames in a loop from wherever its count is, and the clip's own loop
    # point is a jump the tracker rightly takes for another person
    someone = camera.jpegs[:30] + camera.jpegs[29:0:-1]
    rng = np.random.default_rng(0)
    nobody = [cv2.imencode(".jpg", np.clip(rng.normal(90, 30, (144, 176, 3)), 0, 255).astype(np.uint8))[1].tobytes()
              for _ in range(10)]
    camera.jpegs = nobody
    opening, closing = MORNING - 1800, MORNING + 14.5 * 3600  # 07:00 and 22:00 in London

    def at(message: dict, key: str) -> float:
        from datetime import datetime
        return datetime.fromisoformat(message[key].replace("Z", "+00:00")).timestamp()

    def visit_across(moment: float, store_open: bool) -> dict:
        """Someone arrives 8 s before `moment` and leaves once the store's status has changed: their final estimate."""
        after = len(subscriber.json("till-1/estimate"))
        set_clock(moment - 8)
        camera.jpegs = someone
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) > after, 20)
        first = subscriber.json("till-1/estimate")[after]
        assert at(first, "frame_time") < moment, first  # they were there before the change, and seen
        assert subscriber.wait_for(lambda s: s.json("till-pc/status")[-1].get("store_open") is store_open, 20)
        assert subscriber.wait_for(lambda s: at(s.json("till-1/estimate")[-1], "frame_time") > moment + 1, 10)
        camera.jpegs = nobody
        assert subscriber.wait_for(lambda s: any(m["final"] for m in s.json("till-1/estimate")[after:]), 20)
        return next(m for m in subscriber.json("till-1/estimate")[after:] if m["final"])

    with store_at_night(camera, broker, age_models[40], {}, analytics={"interval_s": 1, "k": 1}) as (_, set_clock):
        morning = visit_across(opening, store_open=True)
        assert subscriber.wait_for(lambda s: sum(m["bands"]["35-44"] or 0 for m in s.json("till-1/analytics")) >= 1, 10)
        counted_by_day = sum(m["bands"]["35-44"] or 0 for m in subscriber.json("till-1/analytics"))
        evening = visit_across(closing, store_open=False)
        after_evening = len(subscriber.json("till-1/analytics"))
        assert subscriber.wait_for(lambda s: len(s.json("till-1/analytics")) >= after_evening + 2, 10)
    assert morning["age"] == evening["age"] == 40.0
    assert counted_by_day == 1  # the morning customer, once
    late = [m for m in subscriber.json("till-1/analytics") if at(m, "interval_end") > closing - 8]
    assert late and all(v == 0 for m in late for v in m["bands"].values()), \
        [(m["interval_start"], {k: v for k, v in m["bands"].items() if v}) for m in late if any(m["bands"].values())]


def test_a_wall_clock_stepped_back_ends_the_tracks_and_the_interval_and_frames_go_on(broker, subscriber, age_models,
                                                                                     carphone_clip, caplog):
    """NTP steps a till PC's clock back an hour while a customer stands at the till: their track ends with a final
    estimate, the analytics interval is sent as partial, and estimates go on under the new clock (before: the
    fps limit held every frame back until the clock had caught up)."""
    from datetime import datetime

    from edge.service import Service
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc",
                           "cameras": [{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port},
                           "models": {"age_model": str(age_models[40])}, "analytics": {"k": 1}})
    service = Service(config)
    offset = [0.0]
    service.readers[0].clock = service.pipelines[0].clock = lambda: time.time() + offset[0]
    seconds = lambda iso: datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()  # noqa: E731
    started = time.time()
    service.start()
    try:
        assert subscriber.wait_for(lambda s: len(s.json("till-1/estimate")) >= 1, 30)
        offset[0] = -3600.0
        stepped = time.time()
        assert subscriber.wait_for(lambda s: any(seconds(e["frame_time"]) < stepped - 1800
                                                 for e in s.json("till-1/estimate")), 20)
    finally:
        service.stop(5)
    estimates = subscriber.json("till-1/estimate")
    before = [e for e in estimates if seconds(e["frame_time"]) > stepped - 1800]
    after = [e for e in estimates if seconds(e["frame_time"]) < stepped - 1800]
    assert before[-1]["final"] and {e["track"] for e in before}.isdisjoint(e["track"] for e in after)
    assert subscriber.wait_for(lambda s: len(s.json("till-1/analytics")) >= 2, 10)
    [closed, resumed, *_] = subscriber.json("till-1/analytics")
    assert closed["partial"] and closed["bands"]["35-44"] == 1 and seconds(closed["interval_end"]) > stepped - 5
    assert seconds(closed["interval_start"]) >= started  # counted from the start, not from the quarter hour
    assert resumed["partial"] and abs(seconds(resumed["interval_start"]) - (stepped - 3600)) < 5
    assert service.pipelines[0].clock_steps == 1
    [line] = [r for r in caplog.records if r.getMessage().startswith("the wall clock stepped back")]
    assert line.camera == "till-1" and 3599 < line.seconds < 3601


def test_a_live_config_check_tries_the_camera_broker_and_models_a_line_each(tmp_path, broker, age_models,
                                                                           carphone_clip):
    """`config check --live` at an install: a network camera (its size, frame rate and the face in view), the broker
    with the config's settings, the models run once; then the same config with everything wrong, a line each."""
    import os

    from test_cli import one_line_error
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=20).start()
    source = camera.url.replace("http://", "http://viewer:hunter2@")
    good = write_config(tmp_path / "good.toml", store_id="store-1", cameras=[{"id": "till-1", "source": source}],
                        mqtt={"host": "127.0.0.1", "port": broker.port}, models={"age_model": str(age_models[40])})
    os.chmod(good, 0o600)
    try:
        result = tillsight("config", "check", str(good), "--live")
    finally:
        camera.stop()
    assert result.returncode == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(good), "clock", "face detector", "age model", "broker",
                                                      "camera till-1"], lines
    assert lines[4] == f"broker: 127.0.0.1:{broker.port}: connected"
    size, rate, faces, where, shown = re.fullmatch(
        r"camera till-1: (\S+), ([0-9.]+) frames/s, (\d+) face\(s\) in view at \[(.*)\] \((.*)\)", lines[5]).groups()
    assert (size, faces, shown) == ("176x144", "1", f"http://viewer:***@127.0.0.1:{camera.port}/video.mjpg")
    x0, y0, x1, y1 = (float(v) for v in where.split(", "))  # where it is, as ignore_regions take it
    assert 0.2 < x0 < x1 < 0.8 and 0 < y0 < y1 < 0.8, where
    assert 12 < float(rate) < 25 and "hunter2" not in result.stdout  # about the camera's 20 fps
    assert re.fullmatch(r"age model: file fp32 \(.*\.onnx\) on CPUExecutionProvider, [0-9.]+ ms per face", lines[3])

    camera_port, broker_port, corrupt = free_port(), free_port(), tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    bad = write_config(tmp_path / "bad.toml", store_id="store-1", cameras=[
        {"id": "till-1", "source": f"http://127.0.0.1:{camera_port}/video.mjpg"}],
        mqtt={"host": "127.0.0.1", "port": broker_port}, models={"age_model": str(corrupt)},
        metrics={"enabled": True, "port": broker.port})  # mosquitto's port: in use
    result = tillsight("config", "check", str(bad), "--live")
    assert one_line_error(result) == "tillsight: error: 4 of 6 live checks failed, first the age model"
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert [line.split(": FAILED: ")[0] for line in failed] == ["age model", "broker", "camera till-1", "metrics port"]
    assert failed[3] == (f"metrics port: FAILED: metrics endpoint 127.0.0.1:{broker.port} cannot be served: Address "
                         "already in use (check metrics.port)")  # the daemon's words
    assert failed[0].startswith(f"age model: FAILED: age model {corrupt} cannot be loaded: ")
    assert failed[1:3] == [f"broker: FAILED: MQTT broker at 127.0.0.1:{broker_port}: connection refused (is the broker "
                          "running, on this port?)",  # the daemon's words
                          f"camera till-1: FAILED: cannot open source 'http://127.0.0.1:{camera_port}/video.mjpg'"]


def test_the_reload_check_loads_the_models_and_nothing_else(tmp_path, age_models):
    """`config check --models` (the unit's ExecReload): the models as the daemon would load them, a line each; the
    camera and the broker, which the running daemon holds, are not tried. A corrupt model, or risk mode with a model
    that carries no measured errors, fails it in one line."""
    from test_cli import one_line_error
    sections = dict(store_id="store-1", cameras=[{"id": "till-1", "source": "rtsp://127.0.0.1:9/none"}],
                    mqtt={"host": "127.0.0.1", "port": 9})  # nothing listens: never tried
    good = write_config(tmp_path / "good.toml", models={"age_model": str(age_models[40])}, **sections)
    result = tillsight("config", "check", "--models", str(good))
    assert result.returncode == 0 and result.stderr == "", result
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(good), "face detector", "age model"]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"a model half copied")
    bad = write_config(tmp_path / "bad.toml", models={"age_model": str(corrupt)}, **sections)
    result = tillsight("config", "check", "--models", str(bad))
    assert one_line_error(result) == "tillsight: error: 1 of 2 model checks failed, first the age model"
    assert result.stdout.splitlines()[2].startswith(f"age model: FAILED: age model {corrupt} cannot be loaded: ")
    risky = write_config(tmp_path / "risk.toml", models={"age_model": str(age_models[40])},
                         policy={"mode": "risk"}, **sections)
    result = tillsight("config", "check", "--models", str(risky))
    assert one_line_error(result) == "tillsight: error: 1 of 2 model checks failed, first the age model"
    assert 'policy.mode = "risk" needs an age model that carries its measured errors' in result.stdout


def test_the_live_check_says_a_camera_that_shows_nothing(tmp_path, carphone_clip):
    import cv2
    import numpy as np

    from edge.detect import FaceDetector

    from edge.checkup import check_camera
    from edge.config import CameraConfig
    path = tmp_path / "capped.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(5):
        writer.write(np.full((120, 160, 3), 3, np.uint8))  # a lens cap
    writer.release()
    result = check_camera(CameraConfig(id="till-1", source=str(path)))
    assert (result.ok, result.line()) == (False, (
        f"camera till-1: FAILED: 160x120, 10.0 frames/s (a video file), but the picture is blank (lens covered, "
        f"camera turned away, no signal) ({path})"))

    result = check_camera(CameraConfig(id="till-1", source=str(carphone_clip), ignore_regions=[(0, 0, 1, 0.25)]),
                          FaceDetector())  # the man's face is centred lower down
    assert re.fullmatch(r"camera till-1: 176x144, [0-9.]+ frames/s \(a video file\), 1 face\(s\) in view at "
                        r"\[[0-9., ]+\], 0 in ignore_regions \(.*\)", result.line()), result.line()
    result = check_camera(CameraConfig(id="till-1", source=str(carphone_clip), ignore_regions=[(0, 0, 1, 1)]),
                          FaceDetector())
    assert ", 1 face(s) in view at [" in result.line() and "], 1 in ignore_regions (" in result.line()

    result = check_camera(CameraConfig(id="usb", source=63))  # no /dev/video63 here: it said "cannot open source '63'"
    assert result.line() == ("camera usb: FAILED: USB camera 63: /dev/video63 is not there (no such camera, or it is "
                             "unplugged, or its USB port or hub lost power)")
    result = check_camera(CameraConfig(id="usb", source="/dev/v4l/by-id/usb-Nothing_Here_0000-video-index0"))
    assert result.line() == ("camera usb: FAILED: /dev/v4l/by-id/usb-Nothing_Here_0000-video-index0 is not there (the "
                             "camera is unplugged, or its USB port or hub lost power)")


def test_a_camera_online_before_the_status_loop_runs_is_said_at_once(broker, subscriber, age_models, carphone_clip):
    """On a busy machine the status loop may start after a camera came online: the status must say so at once,
    not at the next status interval (30 s), which left the store seeing the camera `starting`."""
    import threading

    from edge.service import Service
    config = parse_config({"store_id": "store-1", "daemon_id": "till-pc", "status_interval_s": 30,
                           "cameras": [{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                           "mqtt": {"host": "127.0.0.1", "port": broker.port}, "models": {"age_model": str(age_models[40])}})
    service = Service(config)
    service.start()
    done = threading.Event()
    loop = threading.Thread(target=service.run_until_stopped, args=(done,))
    try:
        deadline = time.monotonic() + 20
        while service.readers[0].status.state != "online" and time.monotonic() < deadline:
            time.sleep(0.05)
        loop.start()  # only now
        assert subscriber.wait_for(lambda s: any(m.get("cameras", {}).get("till-1", {}).get("state") == "online"
                                                 for m in s.json("till-pc/status")), 5)
    finally:
        done.set()
        if loop.is_alive():
            loop.join()
        service.stop(5)
