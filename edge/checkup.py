"""`tillsight config check FILE --live`: before a till goes live, try once what its config names.

`config check` alone reads the file; an installer at the till also wants to know that the camera
delivers (and sees the customer's face from where it hangs), that the broker lets this daemon in,
that the models load and run, and that the clock is set, before enabling the service. Each item is
tried the way the daemon does it (`edge.capture.open_source`, the daemon's MQTT client with the
config's credentials and TLS, `edge.service.build_detector` and `build_age_model`) and gives one
line; nothing is published and nothing is written.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import cv2
import numpy as np

from edge.capture import BLANK_STD, missing_device, open_camera, picture_detail, size_mismatch
from edge.config import CameraConfig, Config, OpeningHours
from edge.errors import ModelError
from edge.policy import build_policy
from edge.publish import utc_iso
from edge.service import build_age_model, build_detector, clock_problem
from edge.track import outside_regions

CAMERA_WATCH_S = 1.5  # long enough to measure a camera's frame rate, short enough for a till of four


@dataclass(frozen=True)
class CheckResult:
    item: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.item}: {'' if self.ok else 'FAILED: '}{self.detail}"


def check_clock(now: float, hours: OpeningHours | None = None) -> CheckResult:
    """The clock, and by it whether the store is open now (a wrong time zone shows here)."""
    problem = clock_problem(now)
    local = datetime.fromtimestamp(now, ZoneInfo(hours.timezone)) if hours and hours.timezone else \
        datetime.fromtimestamp(now).astimezone()  # the machine's zone, named
    opening = "" if hours is None else \
        f", {local:%a %H:%M} {local.tzname()} there: the store is {'open' if hours.is_open(now) else 'closed'}"
    return CheckResult("clock", problem is None, problem or f"{utc_iso(now)} (UTC){opening}")


def check_models(config: Config):
    """The face detector and the age model: loaded as the daemon loads them, and run once on a blank input.
    Returns the results and the detector (for the cameras' faces in view), or None if it did not load."""
    detector = None
    try:
        detector = build_detector(config.models)
        detector(np.zeros((360, 640, 3), np.uint8))
        detected = CheckResult("face detector", True, f"{config.models.detector_variant} on "
                                                      f"{detector.session.get_providers()[0]}")
    except ModelError as exc:
        detected = CheckResult("face detector", False, str(exc))
    except Exception as exc:  # noqa: BLE001  any file can be named: a reload's check must never end the daemon
        detected, detector = CheckResult("face detector", False, _unexpected(config.models.detector, exc)), None
    try:
        model = build_age_model(config.models)
        build_policy(config.policy, model.info.metadata)  # risk mode needs a model that carries its errors
        size = model.info.input_size
        model.predict(np.zeros((1, size, size, 3), np.uint8))  # the first call sets ONNX Runtime up
        started = time.perf_counter()
        model.predict(np.zeros((1, size, size, 3), np.uint8))
        described = model.describe()
        aged = CheckResult("age model", True, f"{described['tier']} {described['variant']} ({described['file']}) on "
                                              f"{described['provider']}, {1000 * (time.perf_counter() - started):.1f} "
                                              "ms per face")
    except ModelError as exc:
        aged = CheckResult("age model", False, str(exc))
    except Exception as exc:  # noqa: BLE001  as for the detector
        aged = CheckResult("age model", False, _unexpected(config.models.age_model, exc))
    return [detected, aged], detector


def _unexpected(model, exc: Exception) -> str:
    """One line for a model that loaded and then failed in a way the contract checks did not foresee."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{model or 'the shipped model'} failed on a blank input ({type(exc).__name__}: {first})"


def check_broker(config: Config) -> CheckResult:
    """Connect as the daemon would (credentials, TLS); subscribe to nothing, publish nothing."""
    from edge.pos_terminal import PosError, Terminal
    mqtt = config.mqtt
    try:
        terminal = Terminal(mqtt.host, mqtt.port, f"{mqtt.topic_prefix}/{config.store_id}", "checkup", mqtt_config=mqtt)
    except PosError as exc:
        return CheckResult("broker", False, str(exc))
    terminal.close()
    who = f" as {mqtt.username}" if mqtt.username else ""
    return CheckResult("broker", True, f"{mqtt.host}:{mqtt.port}{who}{' over TLS' if mqtt.tls else ''}: connected")


def check_camera(camera: CameraConfig, detector=None, watch_s: float = CAMERA_WATCH_S) -> CheckResult:
    """Open the source as the daemon does, read for `watch_s`: its picture size, frame rate, and the faces in
    view of the last frame (aiming the camera), or why not."""
    item = f"camera {camera.id}"
    capture = open_camera(camera)
    try:
        if not capture.isOpened():
            busy = " (no such device, or another process reads it: a device has one reader, so stop the " \
                   "tillsight service first)" if camera.is_device else ""
            return CheckResult(item, False, missing_device(camera) or f"cannot open source {camera.shown_source!r}{busy}")
        ok, image = capture.read()
        if not ok or image is None:
            return CheckResult(item, False, f"source {camera.shown_source!r} opened but delivered no frame")
        frames, started = 0, time.monotonic()
        if camera.is_file:
            rate = f"{capture.get(cv2.CAP_PROP_FPS):.1f} frames/s (a video file)"
        else:
            while time.monotonic() - started < watch_s:
                ok, latest = capture.read()
                if not ok or latest is None:
                    return CheckResult(item, False, f"source {camera.shown_source!r} stopped delivering frames")
                frames, image = frames + 1, latest
            rate = f"{frames / (time.monotonic() - started):.1f} frames/s"
    finally:
        capture.release()
    height, width = image.shape[:2]
    mismatch = size_mismatch(camera, image)
    if mismatch is not None:
        return CheckResult(item, False, f"{rate}, but it {mismatch} ({camera.shown_source})")
    if picture_detail(image) < BLANK_STD:
        return CheckResult(item, False, f"{width}x{height}, {rate}, but the picture is blank (lens covered, camera "
                                        f"turned away, no signal) ({camera.shown_source})")
    faces = "" if detector is None else f", {_faces_in_view(camera, detector(image), image.shape)}"
    return CheckResult(item, True, f"{width}x{height}, {rate}{faces} ({camera.shown_source})")


def _faces_in_view(camera: CameraConfig, faces: list, image_shape: tuple) -> str:
    """How many faces the camera shows, where they are (to aim it and to set ignore_regions), and how many of
    them the ignore_regions leave out."""
    height, width = image_shape[:2]
    kept = outside_regions(faces, camera.ignore_regions, image_shape)
    where = ", ".join(f"[{f.box[0] / width:.2f}, {f.box[1] / height:.2f}, {f.box[2] / width:.2f}, "
                      f"{f.box[3] / height:.2f}]" for f in faces)
    ignored = f", {len(faces) - len(kept)} in ignore_regions" if camera.ignore_regions else ""
    return f"{len(faces)} face(s) in view{' at ' + where if faces else ''}{ignored}"


def check_metrics(config: Config) -> CheckResult | None:
    if not config.metrics.enabled:
        return None
    address = (config.metrics.host, config.metrics.port)
    with socket.socket(socket.AF_INET6 if ":" in config.metrics.host else socket.AF_INET) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            from edge.metrics import unservable
            return CheckResult("metrics port", False, unservable(*address, exc))
    return CheckResult("metrics port", True, f"{address[0]}:{address[1]} free")


def run_checks(config: Config, now: float | None = None) -> Iterator[CheckResult]:
    """Every check, in the order an installer fixes things; each result as soon as it is known."""
    yield check_clock(time.time() if now is None else now, config.opening_hours)
    models, detector = check_models(config)
    yield from models
    yield check_broker(config)
    for camera in config.cameras:
        yield check_camera(camera, detector)
    metrics = check_metrics(config)
    if metrics is not None:
        yield metrics
