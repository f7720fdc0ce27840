"""Capture with real OpenCV decoding: replay pacing, fps limit, reconnect with backoff."""

import queue
import threading
import time

import numpy as np
import pytest

from edge.broker import free_port
from edge.capture import END_OF_STREAM, CameraReader
from edge.config import CameraConfig


def drain(frames: queue.Queue, timeout: float = 30) -> list:
    items, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = frames.get(timeout=timeout)
        if item is END_OF_STREAM:
            return items
        items.append(item)
    raise AssertionError("no end of stream")


def test_replay_reads_every_frame_then_ends(carphone_clip):
    frames: queue.Queue = queue.Queue(maxsize=4)  # small: the reader must wait, never drop
    reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=None), frames,
                          threading.Event(), replay=True)
    reader.start()
    items = drain(frames)
    assert len(items) == 120 and [f.index for f in items] == list(range(120))
    assert items[0].image.shape == (144, 176, 3)
    # media timestamps: 29.97 fps
    assert (items[-1].timestamp - items[0].timestamp) == __import__("pytest").approx(119 / 29.97, abs=0.01)
    assert reader.status.state == "ended" and reader.status.frames == 120


def test_fps_limit_uses_the_video_clock_in_replay(carphone_clip):
    frames: queue.Queue = queue.Queue()
    reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=5), frames,
                          threading.Event(), replay=True)
    reader.start()
    items = drain(frames)
    # 4.0 s of video at 5 fps: 20 frames, evenly spaced
    assert len(items) == 20
    gaps = [b.timestamp - a.timestamp for a, b in zip(items, items[1:])]
    assert min(gaps) >= 0.19 and max(gaps) <= 0.21


def test_unreachable_stream_is_retried_with_backoff_and_reported():
    port = free_port()  # nothing listens there
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="ip", source=f"rtsp://127.0.0.1:{port}/live"), queue.Queue(), stop)
    reader.start()
    deadline = time.monotonic() + 20
    while reader.status.reconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join(5)
    assert not reader.is_alive()
    assert reader.status.state == "reconnecting" and reader.status.reconnects >= 2
    assert reader.status.last_error == f"cannot open source 'rtsp://127.0.0.1:{port}/live'"


def test_a_live_reader_keeps_the_newest_frame_when_the_pipeline_lags(carphone_clip):
    # A file opened as a live camera (not replay): it loops, and a full queue drops the oldest frame.
    frames: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=None), frames, stop)
    reader.start()
    deadline = time.monotonic() + 20
    while reader.status.extra.get("dropped", 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join(5)
    assert reader.status.extra["dropped"] >= 10 and frames.qsize() <= 2


@pytest.mark.parametrize("fps_limit", [None, 10])
def test_a_file_as_a_live_camera_plays_at_its_own_rate_and_loops_without_reconnecting(carphone_clip, fps_limit):
    frames: queue.Queue = queue.Queue(maxsize=1000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=fps_limit), frames, stop)
    started = time.monotonic()
    reader.start()
    time.sleep(5.5)  # the clip is 120 frames at 29.97 fps: 4 s, so it loops once
    stop.set()
    reader.join(5)
    seconds = time.monotonic() - started
    received = [frames.get_nowait() for _ in range(frames.qsize())]
    rate = fps_limit or 29.97
    assert 0.85 * rate * seconds <= len(received) <= 1.05 * rate * seconds  # paced, not decoded flat out
    indices = [f.index for f in received]
    assert any(later < earlier for earlier, later in zip(indices, indices[1:]))  # looped
    assert reader.status.state == "online" and reader.status.reconnects == 0
    gaps = np.diff([f.timestamp for f in received])
    assert gaps.max() < 1.5 / rate + 0.05  # evenly spaced, no reconnect pause at the loop
