"""Tracking: one track per customer at a till, and the fusion of its per-frame ages.

A greedy IoU tracker is enough at a till to follow a face: one or two faces,
seen from a fixed camera, moving little between frames. A track that has not
been matched for `lost_after_s` has left. But at a busy till the next
customer steps in at the same spot a moment after the last one left, and box
overlap alone would fuse the two (a teenager into an adult's already judged
track). So a face joins a track only if it also looks like it: an appearance
signature (the aligned face at 24 px in grey, brightness-normalised, and a
hue-saturation histogram) compared with the track's running signature; and
of the tracks it overlaps, it joins the one it looks most like. With looks to
decide, a face also counts as near a track when it moved up to a face width
(a customer walking off, at 10 fps, leaves the box overlap behind).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np

from edge.crop import crop_face
from edge.detect import box_iou
from edge.types import AgeEstimate, Face, TrackEstimate

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
SIGNATURE_MEMORY = 0.3  # weight of the newest frame in a track's running signature
# A track's newest ages all this much younger than its earlier ones (years, or 3 of their spreads if more) are
# another face's: two customers merged into one track, the next one stepping into the last one's spot. Its
# earlier ages are dropped. Fused over up to 100 ages, a 16-year-old merged into an adult's track was outvoted
# for 50 s (2026-11-28 review), every check answered no_challenge meanwhile. Younger only: the light model's ages
# of one man jumped from 30 to 41 as he turned his head (the carphone clip), and dropping a young face's earlier
# ages for such older ones would wave a minor through; older ages merged into a minor's track are outvoted, safely.
SWAPPED_YEARS = 10.0
SWAPPED_SAMPLES = 3


@dataclass
class Signature:
    """What a face looks like, enough to tell the next customer from this one."""

    grey: np.ndarray  # aligned 24x24 grey face, zero mean, unit norm
    colour: np.ndarray  # 12x8 hue-saturation histogram, sums to 1

    @staticmethod
    def of(image_bgr: np.ndarray, face: Face) -> "Signature":
        crop = crop_face(image_bgr, face, 32, 0.2, 0.3)  # RGB, eyes placed alike in every frame
        grey = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (24, 24), interpolation=cv2.INTER_AREA)
        grey = grey.astype(np.float32).ravel()
        grey -= grey.mean()
        hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
        colour = cv2.calcHist([hsv], [0, 1], None, [12, 8], [0, 180, 0, 256]).ravel()
        return Signature(grey / (np.linalg.norm(grey) + 1e-6), colour / (colour.sum() + 1e-6))

    def similarity(self, other: "Signature") -> float:
        """Against a track's running signature, measured on composed till videos (benchmarks/track_draws.py:
        600 customers in 6 draws): the same person 0.57 or more in 99 % of frames; the previous customer
        at most 0.26, and over 0.23 in 5 of 4,547 frames (look-alikes under another light). A face below
        0.23 starts a new track; above, it joins the track it looks most like."""
        return float(self.grey @ other.grey) - 2 * float(cv2.compareHist(self.colour, other.colour,
                                                                        cv2.HISTCMP_BHATTACHARYYA))

    def is_alike(self, other: "Signature", least: float) -> bool:
        """similarity(other) >= least, without the histogram comparison where the grey faces alone rule it out (the
        histogram term only lowers the similarity): a camera compares every face of every frame with up to 64
        still-face candidates."""
        grey = float(self.grey @ other.grey)
        return grey >= least and grey - 2 * float(cv2.compareHist(self.colour, other.colour,
                                                                  cv2.HISTCMP_BHATTACHARYYA)) >= least

    def blend(self, newest: "Signature") -> "Signature":
        grey = (1 - SIGNATURE_MEMORY) * self.grey + SIGNATURE_MEMORY * newest.grey
        return Signature(grey / (np.linalg.norm(grey) + 1e-6),
                         (1 - SIGNATURE_MEMORY) * self.colour + SIGNATURE_MEMORY * newest.colour)


def fuse_ages(ages: list[float] | np.ndarray) -> tuple[float, float]:
    """Robust average of per-frame ages: (estimate, spread in years).

    The estimate is the mean of the samples within 2.5 robust standard
    deviations of the median (a blink, a turned head or a hand over the face
    gives wild single-frame ages); the spread is the robust standard
    deviation, MAD * 1.4826.
    """
    # plain Python: a track holds at most 100 ages, where numpy's calls cost 28 us a fusion and these 2-12 us
    values = [float(age) for age in ages]
    if not values:
        raise ValueError("no ages to fuse")
    median = statistics.median(values)
    spread = MAD_TO_STD * statistics.median([abs(v - median) for v in values])
    if spread == 0:
        return median, 0.0
    inliers = [v for v in values if abs(v - median) <= 2.5 * spread]
    return math.fsum(inliers) / len(inliers), spread


@dataclass
class Track:
    camera_id: str
    track_id: int
    box: tuple[float, float, float, float]
    face_score: float
    first_seen: float
    last_seen: float
    ages: deque = field(default_factory=lambda: deque(maxlen=100))
    alerted: bool = False
    last_published: float | None = None
    published_seen: float | None = None  # last_seen when the last estimate went out: no news, no message
    last_sampled: float | None = None  # when the age network last saw this face
    frames: int = 0  # frames the face was seen in
    signature: Signature | None = None
    # the ages last fused and what they gave: a track is judged and shown at every frame, and new ages come at
    # a few frames of its hundreds (the inference budget); fusing took a sixth of a camera thread's Python time
    _fused: tuple = field(default=((), 0.0, 0.0), repr=False, compare=False)

    def add_age(self, age: AgeEstimate, timestamp: float) -> None:
        self.ages.append(age.age)
        self.last_sampled = timestamp
        # 9 earlier ages at least: the spread of fewer is no measure of a noisy model's wobble
        if len(self.ages) >= 4 * SWAPPED_SAMPLES and self._swapped():
            newest = list(self.ages)[-SWAPPED_SAMPLES:]
            self.ages.clear()
            self.ages.extend(newest)

    def _swapped(self) -> bool:
        """Whether the newest SWAPPED_SAMPLES ages are all a younger face's (see SWAPPED_YEARS)."""
        ages = list(self.ages)
        earlier, spread = fuse_ages(ages[:-SWAPPED_SAMPLES])
        return all(age < earlier - max(SWAPPED_YEARS, 3 * spread) for age in ages[-SWAPPED_SAMPLES:])

    def doubted(self) -> bool:
        """Whether its newest age is far from its estimate (SWAPPED_YEARS): perhaps another face's now, to be
        looked at again at once rather than at the budget's next recheck, a second on."""
        return len(self.ages) > 1 and abs(self.ages[-1] - self.estimate().age) > SWAPPED_YEARS

    def estimate(self) -> TrackEstimate:
        ages = tuple(self.ages)
        if ages != self._fused[0]:
            self._fused = (ages, *fuse_ages(ages))
        _, age, spread = self._fused
        return TrackEstimate(self.camera_id, self.track_id, age, spread, len(self.ages),
                             self.first_seen, self.last_seen, self.box, self.face_score)


def moved_at_most_a_face(before, after) -> bool:
    """Whether box `after`'s centre is within one width of box `before` of its centre (x0, y0, x1, y1)."""
    shift = math.hypot((after[0] + after[2] - before[0] - before[2]) / 2, (after[1] + after[3] - before[1] - before[3]) / 2)
    return bool(shift <= before[2] - before[0])


class FaceTracker:
    """Tracks for one camera."""

    def __init__(self, camera_id: str, iou_threshold: float = 0.2, lost_after_s: float = 1.5, max_samples: int = 100,
                 min_similarity: float | None = 0.23, first_id: int | None = None):
        self.camera_id = camera_id
        self.iou_threshold = iou_threshold
        self.min_similarity = min_similarity  # None: box overlap alone decides
        self.lost_after_s = lost_after_s
        self.max_samples = max_samples
        self.tracks: list[Track] = []
        # Unique across restarts, so a POS keyed on camera and track never merges two customers: ids count on
        # from the start time in milliseconds (a restart begins above every id of the previous run unless that
        # run made more than 1,000 tracks a second); well inside JSON's exact integers (2**53).
        self._next_id = int(time.time() * 1000) if first_id is None else first_id

    def update(self, timestamp: float, faces: list[Face], image_bgr: np.ndarray | None = None,
               looks: list[Signature] | None = None) -> tuple[list[Track], list[Track]]:
        """Match this frame's faces to tracks: (the track of each face, in order; the tracks that have now ended).

        With the frame, faces are also compared by appearance (`looks`: their signatures, if already made).
        Ages are added afterwards (`Track.add_age`), for the faces the inference budget picks."""
        matched: list[Track | None] = [None] * len(faces)
        use_looks = image_bgr is not None and self.min_similarity is not None
        signatures = (looks if looks is not None else [Signature.of(image_bgr, f) for f in faces]) if use_looks \
            else [None] * len(faces)
        if self.tracks and faces:
            candidates = []  # (how well they match, track, face): overlapping enough, and alike where looked at
            for t, track in enumerate(self.tracks):
                looked_at = use_looks and track.signature is not None
                for d, face in enumerate(faces):
                    overlap = box_iou(track.box, face.box)
                    # with looks to decide, a face that moved up to a face width since its track was last seen
                    # (a customer walking off, at 10 fps) is near enough: the overlap alone would start a new track
                    if overlap < self.iou_threshold and not (looked_at and moved_at_most_a_face(track.box, face.box)):
                        continue
                    if looked_at:
                        alike = track.signature.similarity(signatures[d])
                        if alike >= self.min_similarity:  # below: the same spot, someone else, a new customer
                            candidates.append(((alike, float(overlap)), t, d))
                    else:
                        candidates.append(((float(overlap), 0.0), t, d))
            # Best look first, not best overlap: when the next customer steps into the spot the last one has
            # just left, both tracks overlap the face, and the one that looks like it must win.
            used_tracks: set[int] = set()
            for _, t, d in sorted(candidates, key=lambda c: c[0], reverse=True):
                if t in used_tracks or matched[d] is not None:
                    continue
                used_tracks.add(t)
                matched[d] = self.tracks[t]
        for d, face in enumerate(faces):
            if matched[d] is None:
                matched[d] = Track(self.camera_id, self._next_id, face.box, face.score, timestamp, timestamp,
                                   deque(maxlen=self.max_samples))
                self._next_id += 1
                self.tracks.append(matched[d])
            track = matched[d]
            track.box, track.face_score, track.last_seen = face.box, face.score, timestamp
            track.frames += 1
            if signatures[d] is not None:
                track.signature = signatures[d] if track.signature is None else track.signature.blend(signatures[d])
        ended = [t for t in self.tracks if timestamp - t.last_seen > self.lost_after_s]
        self.tracks = [t for t in self.tracks if t not in ended]
        return matched, ended

    def at_the_till(self, seen: list[Track], min_ages: int) -> list[Track]:
        """The customers a check is about: the tracks of this frame's faces (`seen`), and those held, their face
        not found for up to lost_after_s (turned away, looking down), where no face of this frame is, if aged
        `min_ages` times (a customer: fewer is a glimpse, a false detection, which would hold checks up). A held
        track overlapping a face found now is that face's person tracked anew (a turn of the head, the next
        customer in the last one's spot): one person, not two."""
        found = {id(track) for track in seen}
        held = [track for track in self.tracks if id(track) not in found and len(track.ages) >= min_ages
                and all(box_iou(track.box, other.box) < self.iou_threshold for other in seen)]
        return list(seen) + held

    def end_all(self) -> list[Track]:
        ended, self.tracks = self.tracks, []
        return ended

    def discard_at(self, box: tuple) -> list[Track]:
        """Drop, unfinished, the tracks at this place (a face taken for a picture): no final estimate, no count."""
        dropped = [t for t in self.tracks if holds_place(box, t.box)]
        self.tracks = [t for t in self.tracks if t not in dropped]
        return dropped


# A face on a poster, a magazine cover or a packet in view is no customer, yet it would be tracked, aged, counted
# in the analytics at every transaction and make every check `several_faces`. A live face never holds its place:
# in the test clips a face's box moves 10 % of its width or more within every second (and a person standing still
# sways a centimetre or two, a tenth of a face, over a minute). BlazeFace's own jitter on a face held still under
# sensor noise and JPEG, measured on those clips' frames: centre 0.7 to 4.2 %, width 1.9 to 9.7 % of the width
# (87 and 53 px faces). So a face is taken for a picture once it has held its place within these, looking the same
# (Signature: the same person 0.57 or more, another at most 0.26), for `tracking.picture_face_s`; successive
# customers who stand on the same spot are told apart by their looks, and so is a customer in front of a poster.
# Its looks are compared with a running signature of the frames it was seen in (as a track's): one frame's signature
# of a face 35-80 px wide under sensor noise, light flicker and JPEG matched the same poster's later frames under
# 0.5 in up to half of them; with the camera shaking by half a pixel, the frames that failed the looks test (never
# the place) were tracked again as a customer after it was taken for a picture, in tracks of 13 to 21 frames within
# 40 s (tests/test_pipeline_still_faces.py).
PICTURE_LOOKS = 0.5  # a face is the still face seen there before only if it looks this much like it
# ... and a face within a known picture's place (no slack) only this much, as a track asks of its own face
# (tracking.min_similarity's default): the frames a shaking camera spoils most still reach it. But two different
# people reach it too (up to 0.26, Signature.similarity), and a customer standing where a poster hangs was taken
# for it frame after frame, never aged or alerted on, as each such frame was blended into the picture's looks
# (2026-11-27 review: 12 of 68 look-alike pairs mostly swallowed). So a weak likeness counts only within
# PICTURE_WEAK_S of the picture's last full one (a poster under noise reaches 0.5 every few frames; a customer
# in front of it hides it), and only a full likeness moves the picture's signature.
PICTURE_KNOWN_LOOKS = 0.23
PICTURE_WEAK_S = 1.0
PICTURE_WEAK_FRAMES = 3  # ... or within this many weak frames in a row: at 1-2 frames/s a second is one or two
PICTURE_WEAK_FRAMES_S = 3.0  # ... those within this long of the full one (3 frames at 1 frame/s): a picture
# unseen for an hour (covered) must not swallow a look-alike customer's first frames
PICTURE_CENTRE = 0.1  # its centre within this share of its width of where it was first seen
PICTURE_WIDTH = 0.2  # and its width within this share
PICTURE_AWAY = 0.1  # a still face whose look-alike was seen elsewhere in more than this share of frames has moved
PICTURE_CANDIDATES = 64  # still faces watched at once: beyond, the least lately seen are dropped
PICTURE_SLACK = 1.5  # a known picture is matched within this many times the tolerances: no outlier slips past
PICTURE_GAP_S = 10.0  # unseen this long (a customer in front of it), a candidate starts over
PICTURE_FORGET_S = 3600.0  # a picture unseen this long is forgotten (taken down, or covered for good)


def holds_place(anchor: tuple, box: tuple, slack: float = 1.0) -> bool:
    """Whether `box` is where `anchor` is, to within a face detector's jitter on a still face (times `slack`)."""
    width = anchor[2] - anchor[0]
    shift = math.hypot((box[0] + box[2] - anchor[0] - anchor[2]) / 2, (box[1] + box[3] - anchor[1] - anchor[3]) / 2)
    return bool(shift <= PICTURE_CENTRE * slack * width and
                abs((box[2] - box[0]) - width) <= PICTURE_WIDTH * slack * width)


@dataclass
class StillFace:
    box: tuple[float, float, float, float]  # where it was first seen
    signature: Signature  # what it looks like: first seen, then blended with each frame it is seen in its place
    since: float  # when it was first seen there
    last_seen: float
    frames: int = 1  # frames it was seen in its place
    away: int = 0  # frames in which a face like it was seen elsewhere, and it not in its place
    alike_at: float | None = None  # when it was last seen fully alike (PICTURE_LOOKS); None: `since`
    weak: int = 0  # frames in a row it was seen only weakly alike since

    def is_seen_in(self, face: Face, signature: Signature, slack: float = 1.0) -> bool:
        return holds_place(self.box, face.box, slack) and self.signature.is_alike(signature, PICTURE_LOOKS)

    def shows(self, face: Face, signature: Signature, now: float) -> str | None:
        """Whether this known picture is `face`: "alike" (in its place within PICTURE_SLACK, and alike), "weakly" (in
        its place, as alike as a track's own face must be, and seen alike within PICTURE_WEAK_S, or
        PICTURE_WEAK_FRAMES within PICTURE_WEAK_FRAMES_S), else None."""
        if not holds_place(self.box, face.box, PICTURE_SLACK):
            return None
        if self.signature.is_alike(signature, PICTURE_LOOKS):
            return "alike"
        alike_at = self.since if self.alike_at is None else self.alike_at
        since_alike = now - alike_at
        recent = 0 <= since_alike <= PICTURE_WEAK_S or (self.weak < PICTURE_WEAK_FRAMES
                                                          and 0 <= since_alike <= PICTURE_WEAK_FRAMES_S)
        if recent and holds_place(self.box, face.box) and self.signature.is_alike(signature, PICTURE_KNOWN_LOOKS):
            return "weakly"
        return None

    def seen(self, signature: Signature, now: float, alike: bool = True) -> None:
        """Seen in its place at `now`: if fully alike, its running signature takes this frame in."""
        self.last_seen = now
        self.weak = 0 if alike else self.weak + 1
        if alike:
            self.alike_at = now
            self.signature = self.signature.blend(signature)


class PictureFaces:
    """The faces in one camera's view that are pictures, not people: once taken for one, a face at that place is
    left out before tracking, so it is never aged, counted, alerted on or answered about."""

    def __init__(self, after_s: float):
        self.after_s = after_s  # 0: no face is ever taken for a picture
        self.candidates: list[StillFace] = []
        self.pictures: list[StillFace] = []

    def sift(self, faces: list[Face], now: float, image_bgr: np.ndarray, signatures: list[Signature] | None = None
             ) -> tuple[list[Face], list[StillFace]]:
        """(this frame's faces that may be people, the pictures recognised at this frame). `signatures`: the
        faces' own, if already made."""
        if not self.after_s:
            return faces, []
        self.candidates = [c for c in self.candidates if 0 <= now - c.last_seen <= PICTURE_GAP_S]
        self.pictures = [p for p in self.pictures if now - p.last_seen <= PICTURE_FORGET_S]
        people, recognised, elsewhere, looks, seen = [], [], [], [], set()
        for i, face in enumerate(faces):
            signature = signatures[i] if signatures is not None else Signature.of(image_bgr, face)
            picture, how = next(((p, how) for p in self.pictures if (how := p.shows(face, signature, now))),
                                (None, None))
            if picture is not None:
                picture.seen(signature, now, alike=how == "alike")
                continue
            looks.append(signature)
            candidate = next((c for c in self.candidates if id(c) not in seen and c.is_seen_in(face, signature)), None)
            if candidate is None:
                elsewhere.append((face, signature))
            else:
                seen.add(id(candidate))
                candidate.seen(signature, now)
                candidate.frames += 1
                if now - candidate.since >= self.after_s:
                    self.candidates.remove(candidate)
                    self.pictures.append(candidate)
                    recognised.append(candidate)
                    continue
            people.append(face)
        # A still face whose look-alike is seen elsewhere in more than a tenth of the frames has moved: it was a
        # person (a customer who sways and steps about passes back through where they stood, and must not add up a
        # minute there). A few such frames are the detector's outliers (a poster: about 1 in 300); a still face
        # seen in place in this frame has not moved (two copies of one poster are both still).
        moved = {id(c) for c in self.candidates for signature in looks
                 if id(c) not in seen and c.signature.is_alike(signature, PICTURE_LOOKS)}
        for candidate in self.candidates:
            if id(candidate) in moved:
                candidate.away += 1
        self.candidates = [c for c in self.candidates if c.away < 3 or c.away <= PICTURE_AWAY * (c.frames + c.away)]
        for face, signature in elsewhere:  # watched from here on
            self.candidates.append(StillFace(face.box, signature, now, now))
        if len(self.candidates) > PICTURE_CANDIDATES:  # the least lately seen go
            self.candidates = sorted(self.candidates, key=lambda c: c.last_seen)[-PICTURE_CANDIDATES:]
        return people, recognised


def outside_regions(faces: list[Face], regions: list, image_shape: tuple) -> list[Face]:
    """The faces whose centre lies in none of a camera's `ignore_regions` ([x0, y0, x1, y1] as shares of the
    picture): the cashier's seat, the next till, a screen showing faces."""
    if not regions:
        return faces
    height, width = image_shape[:2]
    return [f for f in faces if not any(x0 <= (f.box[0] + f.box[2]) / 2 / width <= x1 and
                                        y0 <= (f.box[1] + f.box[3]) / 2 / height <= y1 for x0, y0, x1, y1 in regions)]
