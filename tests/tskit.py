"""Helpers for the tests: a POS-like subscriber, config files, the CLI in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[1]


def _set(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false")


def absent(reason: str, make_installs: bool = True):
    """What a test needs is not here: skipped with the reason when pytest is run by hand; a failure where it must be
    there, so that a skip never passes off what was not tested: under CI (every tool, extra and ../shared), and
    under `make test` (TILLSIGHT_TESTS_STRICT) for what it installs (`make_installs`; not ../shared)."""
    if _set("CI") or (make_installs and _set("TILLSIGHT_TESTS_STRICT")):
        pytest.fail(f"{reason} (a failure here, not a skip: {'CI' if _set('CI') else 'make test'} provides it)")
    pytest.skip(reason)


class Subscriber:
    """A POS-like MQTT client that records every message."""

    def __init__(self, port: int, topic: str = "#", persistent_id: str | None = None):
        """`persistent_id`: a session the broker keeps across our disconnects (and, with its persistence on,
        across its restarts): QoS 1 messages published meanwhile are queued for us."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=persistent_id or
                                  f"test-sub-{time.monotonic_ns()}", clean_session=persistent_id is None)
        self.client.reconnect_delay_set(0.2, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(5), "subscriber could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def json(self, suffix: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def payloads(self, topic: str) -> list[bytes]:
        """The raw payloads received on exactly this topic, in order."""
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def since(self, start: int) -> list[tuple[str, dict]]:
        """(topic, JSON body) of the messages from index `start` on."""
        with self._lock:
            return [(t, json.loads(p)) for t, p, _ in self.messages[start:]]

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, **sections) -> Path:
    """A TOML config from keyword sections (dicts) and top-level scalars."""
    lines = []
    tables = {k: v for k, v in sections.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in sections.items() if isinstance(v, list)}
    for key, value in sections.items():
        if key not in tables and key not in arrays:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    for name, items in arrays.items():
        for item in items:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tillsight(*args: str, timeout: float = 240, python: str = sys.executable, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a child process (`python`: another environment's interpreter)."""
    return subprocess.run([python, "-m", "edge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)


def run_error(result: subprocess.CompletedProcess, code: int) -> dict:
    """`run`'s last words under `[logging] format = "json"` (the default): a JSON log line at level error, as its
    log lines are, after them; where it was a plain line a log pipeline could not parse it."""
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    record = json.loads(lines[-1])
    assert (record["level"], record["logger"]) == ("error", "edge.cli") and {"time", "msg"} <= set(record), record
    return record


def clear_of_a_day_boundary(needed_s: float = 180.0) -> None:
    """Wait out local midnight if it is less than `needed_s` away: a test that counts customers in a daily
    analytics interval (aligned in local time, edge/analytics.py) must not see that interval end under it."""
    now = time.time()
    local = now + time.localtime(now).tm_gmtoff
    to_midnight = 86_400 - local % 86_400
    if to_midnight < needed_s:
        time.sleep(to_midnight + 1)


def start_daemon(config: Path, log: Path) -> subprocess.Popen:
    """`tillsight run` in a child process, its log lines (JSON) into `log`."""
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def stop_daemon(process: subprocess.Popen) -> None:
    """SIGTERM (a clean stop: the offline status), then make sure it is gone."""
    import signal
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    finally:
        process.kill()


class MjpegCamera:
    """An IP camera on loopback: MJPEG over HTTP (multipart/x-mixed-replace), as many
    network cameras serve it, streaming a real clip's frames at `fps` in a loop.
    `stop()` makes it vanish mid-stream; `start()` brings it back on the same port."""

    def __init__(self, video: Path, fps: float = 30.0):
        import cv2
        capture = cv2.VideoCapture(str(video))
        self.jpegs = []
        while True:
            ok, image = capture.read()
            if not ok:
                break
            self.jpegs.append(cv2.imencode(".jpg", image)[1].tobytes())
        self.fps = fps
        self.port = None
        self.server = None
        self.running = threading.Event()

    def start(self) -> "MjpegCamera":
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                index = 0
                try:
                    while camera.running.is_set():
                        jpeg = camera.jpegs[index % len(camera.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                        index += 1
                        time.sleep(1 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.running.set()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def stop(self) -> None:
        self.running.clear()
        self.server.shutdown()
        self.server.server_close()


def compose_till_video(faces: list, path: Path, fps: float = 10.0, seconds: float = 3.0, gap_s=0.5,
                       size: tuple[int, int] = (640, 360), face_px: int = 140, seed: int = 0,
                       walk: bool = True, light_steps: bool = False, poster=None) -> list[tuple[float, float]]:
    """A till camera's view of customers one after another, composed from labelled face photos.

    `faces`: BGR photos (UTKFace chips: the face fills the photo). Each customer walks in from the side
    (0.4 s; with `walk=False` they appear at the till spot at once, as when the next customer steps
    straight in), stands at the till with small head movements, light drift and sensor noise, walks
    out, then `gap_s` of empty till (a number, or a (low, high) range drawn per customer).
    `light_steps`: each customer under a different light level. `poster`: a face photo on the wall behind
    the till, upper right, in every frame. Written with OpenCV (mp4v). Returns
    each customer's (enter, leave) in video seconds. Generated at test time from ../shared: never
    commit the result.
    """
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    width, height = size
    texture = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), np.uint8), (0, 0), 9)
    background = cv2.addWeighted(texture, 0.6, np.full_like(texture, 110), 0.4, 0)
    if poster is not None:
        side = face_px * 2 // 3
        x, y = int(width * 0.85) - side // 2, int(height * 0.25) - side // 2
        background[y:y + side, x:x + side] = cv2.resize(poster, (side, side), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    spot = np.array([width * 0.5, height * 0.45])
    # sensor noise drawn once, a frame's worth at a time: drawing it per frame was most of the time
    noise = [rng.normal(0, 4, (height, width, 3)).astype(np.int16) for _ in range(16)]
    times, frame_index = [], 0
    walk_frames = max(1, round(0.4 * fps)) if walk else 0
    for photo in faces:
        start = frame_index / fps
        total = round(seconds * fps)
        level = rng.uniform(0.7, 1.3) if light_steps else 1.0
        for i in range(total):
            entering = min(1.0, (i + 1) / walk_frames) if walk_frames else 1.0
            leaving = min(1.0, (total - i) / walk_frames) if walk_frames else 1.0
            offset = (1 - min(entering, leaving)) * (width * 0.45)
            centre = spot + [offset if i > total / 2 else -offset, 0] + rng.normal(0, 2.0, 2)
            scale = face_px / max(photo.shape[:2]) * (1 + rng.normal(0, 0.02))
            angle = rng.normal(0, 2.0)
            matrix = cv2.getRotationMatrix2D((photo.shape[1] / 2, photo.shape[0] / 2), angle, scale)
            matrix[:, 2] += centre - [photo.shape[1] / 2, photo.shape[0] / 2]
            mask = cv2.warpAffine(np.full(photo.shape[:2], 255, np.uint8), matrix, size)
            person = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR)
            frame = np.where(mask[..., None] > 127, person, background)
            light = level * (1 + 0.15 * np.sin(frame_index / fps * 1.3))  # the shop's light drifts
            frame = cv2.convertScaleAbs(frame, alpha=light).astype(np.int16) + noise[rng.integers(len(noise))]
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            writer.write(frame)
            frame_index += 1
        times.append((start, frame_index / fps))
        gap = rng.uniform(*gap_s) if isinstance(gap_s, tuple) else gap_s
        for _ in range(round(gap * fps)):
            writer.write(background)
            frame_index += 1
    writer.release()
    return times


def write_faulty_clip(source: Path, path: Path, live_s: float, blank_s: float = 0.0, frozen_s: float = 0.0,
                      fps: float = 10.0) -> Path:
    """A camera that fails: `live_s` of `source` (every third frame, so the picture changes), then
    `blank_s` of a covered lens (dark sensor noise: every frame differs, none shows anything), then
    the last frame again and again for `frozen_s`, as a hung stream delivers it. Motion JPEG in AVI:
    each frame is coded alone, so the repeated frames decode to identical pixels."""
    import cv2
    import numpy as np
    capture = cv2.VideoCapture(str(source))
    frames = []
    while len(frames) < round(live_s * fps):
        ok, image = capture.read()
        if not ok:
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        if int(capture.get(cv2.CAP_PROP_POS_FRAMES)) % 3 == 0:
            frames.append(image)
    capture.release()
    rng = np.random.default_rng(0)
    frames += [np.clip(rng.normal(6, 3, frames[0].shape), 0, 255).astype(np.uint8) for _ in range(round(blank_s * fps))]
    frames += [frames[-1]] * round(frozen_s * fps)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for image in frames:
        writer.write(image)
    writer.release()
    return path


def oversized_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 70-byte PNG whose header claims more pixels than OpenCV decodes (2^30): its decoders raised cv2.error."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
