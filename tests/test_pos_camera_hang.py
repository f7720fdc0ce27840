"""The POS conversation with a camera stream that hangs (connected, no frames) and a daemon that stops while a check
waits: a real daemon, a real mosquitto, a network camera the test controls."""

from __future__ import annotations

import re
import signal
import threading
import time

from edge.pos_terminal import Terminal
from tskit import MjpegCamera, Subscriber, start_daemon, stop_daemon, write_config

BASE = "tillsight/store-1"


def test_a_hung_camera_is_never_answered_from_its_last_frame_and_a_stopping_daemon_says_so(
        tmp_path, broker, age_models, carphone_clip):
    """The stream hangs: its reader sees no failure for seconds, and the last frame (an adult) stays the latest.
    A check then waits for a fresh frame until its deadline and is answered camera_fault ("no frame for ..."),
    incomplete: not no_challenge from the old picture, nor no_face. A check still waiting when the daemon gets
    SIGTERM is answered at once, camera_fault "daemon stopping", not no_face."""
    camera = MjpegCamera(carphone_clip, fps=10).start()
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                          cameras=[{"id": "till-1", "source": camera.url, "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    estimates = Subscriber(broker.port, f"{BASE}/till-1/estimate")
    log = tmp_path / "daemon.log"
    process = start_daemon(config, log)
    terminal = Terminal("127.0.0.1", broker.port, BASE, "t1")
    waiting: list[dict] = []
    try:
        assert estimates.wait_for(lambda s: s.messages, 40), log.read_text()
        live = terminal.check("till-1", "alcohol", timeout_s=5)
        # the stream stalls after its next frame (the camera's server sleeps 1/fps between frames), the connection
        # open: the reader's read times out after 5 s (edge/capture.py), and till then no fault is known
        camera.fps = 1e-3
        time.sleep(1.5)  # the last frame is now over FRESH_FRAME_S (1 s) old
        hung = terminal.check("till-1", "alcohol", timeout_s=5, deadline_s=1.0)
        asking = threading.Thread(target=lambda: waiting.append(
            terminal.check("till-1", "alcohol", timeout_s=10, deadline_s=10)), daemon=True)
        asking.start()
        time.sleep(0.5)
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        asking.join(10)
        answered_in = time.monotonic() - stopped_at
    finally:
        terminal.close()
        stop_daemon(process)
        camera.stop()
        estimates.close()
    assert (live["decision"], live["complete"]) == ("no_challenge", True)
    assert (hung["decision"], hung["complete"], hung["age"], hung["frame_time"]) == \
        ("camera_fault", False, None, None), hung
    assert re.fullmatch(r"no frame for \d+\.\d s \(a hung camera stream, or the daemon far behind\)",
                        hung["camera_fault"]) and hung["waited_ms"] >= 990, hung
    [stopping] = waiting
    assert (stopping["decision"], stopping["camera_fault"], stopping["complete"]) == \
        ("camera_fault", "daemon stopping", False), stopping
    assert answered_in < 1.5, answered_in
