"""Nothing silent: a failing model, a damaged video, a stale track, each says so."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import urllib.request

import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edge.broker import free_port
from edge.config import parse_config
from edge.policy import build_policy
from edge.service import CameraPipeline
from edge.track import Track
from test_bad_inputs import nan_age_model
from tskit import REPO, tillsight, write_config


def test_an_age_model_that_fails_when_run_makes_the_daemon_degraded_in_status_and_metrics(
        tmp_path, broker, subscriber, hamilton_clip):
    model = tmp_path / "age.onnx"
    model.write_bytes(nan_age_model())
    port = free_port()
    config = write_config(tmp_path / "c.toml", store_id="s", daemon_id="pc",
                          cameras=[{"id": "till-1", "source": str(hamilton_clip), "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port}, models={"age_model": str(model)},
                          metrics={"enabled": True, "port": port}, logging={"level": "warning"})
    daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert subscriber.wait_for(lambda s: any(b["state"] == "degraded" for b in s.json("pc/status")), 60)
        status = [b for b in subscriber.json("pc/status") if b["state"] == "degraded"][0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = {s.name: s.value for f in text_string_to_metric_families(response.read().decode())
                       for s in f.samples}
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
    assert any(p.startswith("age model failing: ") and "NaN" in p for p in status["problems"])
    assert status["age_errors"] >= 1
    assert metrics["tillsight_degraded"] == 1 and metrics["tillsight_age_errors_total"] >= 1
    assert len([line for line in err.splitlines() if "age inference failing" in line]) == 1  # once, not per frame
    assert subscriber.json("till-1/estimate") == []


def test_a_video_damaged_in_the_middle_fails_the_replay_in_one_line(tmp_path, broker, age_models, hamilton_clip):
    source = cv2.VideoCapture(str(hamilton_clip))
    video = tmp_path / "damaged.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 180))
    for _ in range(60):
        ok, image = source.read()
        writer.write(cv2.resize(image, (320, 180)))
    writer.release()
    data = bytearray(video.read_bytes())
    middle = slice(int(len(data) * 0.45), int(len(data) * 0.55))
    data[middle] = bytes(middle.stop - middle.start)  # a tenth of the file zeroed half way
    video.write_bytes(bytes(data))
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "x", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    result = tillsight("replay", str(video), "--config", str(config),
                       env={**os.environ, "OPENCV_FFMPEG_LOGLEVEL": "-8"})  # the decoder's own complaints
    assert result.returncode == 1, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("tillsight")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("tillsight: error: camera replay: video stopped at frame ")
    assert lines[0].endswith(" of 60: corrupt or truncated")


class RecordingPublisher:
    """Collects what the pipeline would publish (the broker's side is tested everywhere else)."""

    def __init__(self):
        self.estimates = []

    def publish_estimate(self, estimate, final, frame_time, transaction=None):
        self.estimates.append((estimate.track_id, final, frame_time))

    def publish_alert(self, *args, **kwargs):
        pass


def test_a_track_not_seen_in_new_frames_is_not_published_again():
    config = parse_config({"store_id": "s", "cameras": [{"id": "c", "source": 0}],
                           "tracking": {"estimate_interval_s": 1.0, "lost_after_s": 10}})
    publisher = RecordingPublisher()
    pipeline = CameraPipeline(config.cameras[0], config, queue.Queue(), None, None, publisher,
                              threading.Event(), build_policy(config.policy, {}))
    track = Track("c", 7, (0, 0, 50, 50), 0.9, 0.0, 0.0)
    for age in (30, 31, 32):
        track.ages.append(age)
    pipeline._judge(track, 0.0)
    for now in (1.5, 3.0, 4.5):  # the face is hidden (not lost yet): no news, no message
        pipeline._judge(track, now)
    assert publisher.estimates == [(7, False, 0.0)]
    track.last_seen = 5.0  # seen again
    pipeline._judge(track, 6.0)
    assert publisher.estimates[-1] == (7, False, 6.0) and len(publisher.estimates) == 2
    assert np.isclose(track.estimate().age, 31)


def test_every_phrase_of_the_operators_table_is_one_the_daemon_says():
    """deploy/README.md's "When a till is not right" quotes the status's states and problems: each quoted phrase
    must be in the code that says it, or an operator searching for it would find nothing."""
    import re
    section = (REPO / "deploy" / "README.md").read_text().split("## When a till is not right", 1)[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    said = "".join(path.read_text() for path in sorted((REPO / "edge").glob("*.py"))).replace('\\"', '"')
    quoted = [phrase for row in rows for phrase in re.findall(r"`([^`]+)`", row.split(" | ")[0])]
    assert len(rows) >= 18 and {"failed", "offline", "stale", "degraded"} <= set(quoted), quoted
    assert [phrase for phrase in quoted if phrase not in said] == []
