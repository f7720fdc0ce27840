"""A face on a poster behind the till, through the real detector, under what a real camera adds to a still picture:
sensor noise, light flicker, JPEG (an MJPEG camera) and a camera that shakes by a fraction of a pixel (a till's
conveyor belt). Posters composed at test time from UTKFace validation faces (../shared, never committed)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge.detect import FaceDetector
from edge.track import FaceTracker, PictureFaces
from training.data import iter_image_bytes, read_labels, select, split_of

FPS = 5  # a camera's default fps_limit
PICTURE_FACE_S = 20.0
SIZE = (640, 360)


@pytest.fixture(scope="module")
def posters(utkface):
    labels = select([l for l in read_labels(utkface / "labels.csv") if split_of(l.file_name, 0.1) == "val"], 4)
    photos = dict(iter_image_bytes(utkface, {l.file_name for l in labels}))
    return [cv2.imdecode(np.frombuffer(photos[l.file_name], np.uint8), cv2.IMREAD_COLOR) for l in labels]


def still_poster_frames(poster, side: int, shake_px: float, seconds: float, seed: int):
    """A till's background with `poster` on the wall (upper right, `side` px), frame after frame: the camera
    shaken by `shake_px` (standard deviation, sub-pixel), the light flickering by up to 15 %, sensor noise, and each
    frame JPEG-coded at quality 60 and decoded again."""
    rng = np.random.default_rng(seed)
    width, height = SIZE
    texture = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), np.uint8), (0, 0), 9)
    wall = cv2.addWeighted(texture, 0.6, np.full_like(texture, 110), 0.4, 0)
    x, y = int(width * 0.8) - side // 2, int(height * 0.28) - side // 2
    wall[y:y + side, x:x + side] = cv2.resize(poster, (side, side), interpolation=cv2.INTER_AREA)
    for _ in range(round(seconds * FPS)):
        shift = np.float32([[1, 0, rng.normal(0, shake_px)], [0, 1, rng.normal(0, shake_px)]])
        frame = cv2.warpAffine(wall, shift, SIZE, borderMode=cv2.BORDER_REFLECT) if shake_px else wall
        frame = frame.astype(np.float32) * (1 + rng.uniform(-0.15, 0.15)) + rng.normal(0, 5, frame.shape)
        jpeg = cv2.imencode(".jpg", np.clip(frame, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 60])[1]
        yield cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


@pytest.mark.parametrize("side, shake_px", [(80, 0.0), (50, 0.6)])
def test_a_still_poster_under_a_real_cameras_noise_stays_a_picture_once_taken_for_one(posters, side, shake_px):
    """Before, a poster taken for a picture was compared with the signature of the one frame it was first seen in:
    in the frames whose looks fell under 0.5 of that (its place held in every one), it was a customer again after
    picture_face_s, in tracks of 3 frames (no shake) and 13 to 21 (shaken): aged, counted, alerted on. Now: at most
    a glimpse, never aged enough to be judged."""
    detector = FaceDetector(min_face_px=24)  # models.min_face_px's default
    results, lines = [], []
    for k, poster in enumerate(posters):
        pictures, tracker = PictureFaces(PICTURE_FACE_S), FaceTracker("till", first_id=1)
        recognised_at, boxes, leaked, longest = None, [], 0, 0
        for i, image in enumerate(still_poster_frames(poster, side, shake_px, PICTURE_FACE_S + 40, seed=k)):
            t = i / FPS
            faces = detector(image)
            boxes += [f.box for f in faces]
            kept, recognised = pictures.sift(faces, t, image)
            for picture in recognised:
                tracker.discard_at(picture.box)
                recognised_at = recognised_at or t
            tracks, _ = tracker.update(t, kept, image)
            if recognised_at is not None:
                leaked += len(kept)
                longest = max([longest] + [track.frames for track in tracks])
        b = np.array(boxes)
        widths = b[:, 2] - b[:, 0]
        centres = (b[:, :2] + b[:, 2:]) / 2
        jitter = np.hypot(*(centres - np.median(centres, axis=0)).T) / np.median(widths)
        results.append((recognised_at, leaked, longest))
        lines.append(f"poster {k}: {np.median(widths):.0f} px, centre jitter p95 {np.percentile(jitter, 95):.1%}, "
                     f"taken for a picture at {recognised_at} s, then {leaked} frames kept as a face, "
                     f"the longest track {longest} frames")
    print(f"side {side} px, shake {shake_px} px:\n  " + "\n  ".join(lines))
    assert all(at is not None and at <= PICTURE_FACE_S + 2 for at, _, _ in results), lines  # on time, every one
    # after: never a customer's track (min_samples = 3 ages need 3 frames), and seldom a glimpse
    assert all(longest <= 2 and leaked <= 0.03 * 40 * FPS for _, leaked, longest in results), lines


def poster_then_customer_frames(poster, customer, side: int, poster_s: float, customer_s: float, seed: int):
    """`poster` alone on the wall for `poster_s`, then `customer`'s face exactly in its place (standing in front of
    it) for `customer_s`, under sensor noise and flicker (the review's scene). Yields (t, frame)."""
    rng = np.random.default_rng(seed)
    width, height = SIZE
    texture = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), np.uint8), (0, 0), 9)
    wall = cv2.addWeighted(texture, 0.6, np.full_like(texture, 110), 0.4, 0)
    x, y = int(width * 0.5) - side // 2, int(height * 0.4) - side // 2
    for i in range(round((poster_s + customer_s) * FPS)):
        t = i / FPS
        frame = wall.copy()
        frame[y:y + side, x:x + side] = cv2.resize(poster if t < poster_s else customer, (side, side),
                                                   interpolation=cv2.INTER_AREA)
        frame = frame.astype(np.float32) * (1 + rng.uniform(-0.1, 0.1)) + rng.normal(0, 4, frame.shape)
        yield t, np.clip(frame, 0, 255).astype(np.uint8)


def test_a_customer_standing_where_a_poster_hangs_is_a_customer_after_a_second(utkface):
    """A face in a known picture's place needs only a track's likeness (0.23) to be the picture, and two different
    people reach that (up to 0.26). With every such frame blended into the picture's looks, a look-alike customer
    standing in front of a poster was the poster frame after frame (2026-11-27 review: these two UTKFace faces,
    similarity 0.23: 50 of 50 frames): never aged, never alerted on. Now a weak likeness counts only within
    PICTURE_WEAK_S of a full one, and only a full one moves the picture's looks."""
    from edge.track import PICTURE_WEAK_S
    labels = select([l for l in read_labels(utkface / "labels.csv") if split_of(l.file_name, 0.1) == "val"], 40)
    chosen = [labels[23], labels[39]]  # the look-alike pair the review found (a 35- and a 26-year-old)
    photos = dict(iter_image_bytes(utkface, {l.file_name for l in chosen}))
    poster, customer = (cv2.imdecode(np.frombuffer(photos[l.file_name], np.uint8), cv2.IMREAD_COLOR) for l in chosen)
    detector = FaceDetector(min_face_px=24)
    pictures, tracker = PictureFaces(PICTURE_FACE_S), FaceTracker("till", first_id=1)
    recognised_at, swallowed, longest = None, 0, 0
    arrives = PICTURE_FACE_S + 5
    for t, image in poster_then_customer_frames(poster, customer, 80, arrives, 10.0, seed=23):
        faces = detector(image)
        kept, recognised = pictures.sift(faces, t, image)
        for picture in recognised:
            tracker.discard_at(picture.box)
            recognised_at = recognised_at or t
        tracks, _ = tracker.update(t, kept, image)
        if t >= arrives:
            swallowed += len(faces) - len(kept)
            longest = max([longest] + [track.frames for track in tracks])
    assert recognised_at is not None and recognised_at <= PICTURE_FACE_S + 2  # the poster was taken for one
    # at most the first PICTURE_WEAK_S of the customer goes as the poster; then a track long enough to be aged
    assert swallowed <= PICTURE_WEAK_S * FPS + 1, swallowed
    assert longest >= 10 * FPS - PICTURE_WEAK_S * FPS - 2, longest


def test_a_known_pictures_weak_likeness_holds_a_second_or_three_frames_after_a_full_one():
    """At 5 frames/s a second of weak frames is 5; at 1-2 frames/s it was one or two, and a small poster under
    noise came back as a customer's track of up to 8 frames (2026-11-27 review). Three weak frames in a row are
    taken whatever the rate; then a full likeness again, or the face is someone else."""
    from edge.track import PICTURE_WEAK_FRAMES, Signature, StillFace
    from edge.types import Face

    def looks(similarity: float) -> Signature:
        grey = np.zeros(576, np.float32)
        grey[0], grey[1] = similarity, np.sqrt(1 - similarity ** 2)
        colour = np.full(96, 1 / 96, np.float32)
        return Signature(grey, colour)

    box = (100.0, 50.0, 150.0, 100.0)
    face = Face(box, 0.9, left_eye=(115.0, 65.0), right_eye=(135.0, 65.0))
    for fps, weak_frames in ((1.0, PICTURE_WEAK_FRAMES), (5.0, 5)):
        picture = StillFace(box, looks(1.0), since=0.0, last_seen=0.0)
        answers = []
        for i in range(1, 10):
            t = i / fps
            how = picture.shows(face, looks(0.3), t)  # weakly alike: 0.3, between 0.23 and 0.5
            answers.append(how)
            if how is not None:
                picture.seen(looks(0.3), t, alike=how == "alike")
        assert answers == ["weakly"] * weak_frames + [None] * (9 - weak_frames), (fps, answers)
        assert picture.shows(face, looks(1.0), 10 / fps) == "alike"  # a full likeness is the picture at any time
    # the frames rule is no licence for ever: a picture fully seen an hour ago (covered since) takes no weak frame
    picture = StillFace(box, looks(1.0), since=0.0, last_seen=0.0)
    assert [picture.shows(face, looks(0.3), t) for t in (3.0, 3.1, 3600.0)] == ["weakly", None, None]
