"""Tracking: one track per customer at a till, and the fusion of its per-frame ages.

A greedy IoU tracker is enough at a till: one or two faces, seen from a
fixed camera, moving little between frames. A track that has not been
matched for `lost_after_s` has left.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge.detect import iou
from edge.types import AgeEstimate, Face, TrackEstimate

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def fuse_ages(ages: list[float] | np.ndarray) -> tuple[float, float]:
    """Robust average of per-frame ages: (estimate, spread in years).

    The estimate is the mean of the samples within 2.5 robust standard
    deviations of the median (a blink, a turned head or a hand over the face
    gives wild single-frame ages); the spread is the robust standard
    deviation, MAD * 1.4826.
    """
    values = np.asarray(ages, np.float64)
    if values.size == 0:
        raise ValueError("no ages to fuse")
    median = float(np.median(values))
    spread = MAD_TO_STD * float(np.median(np.abs(values - median)))
    if spread == 0:
        return median, 0.0
    inliers = values[np.abs(values - median) <= 2.5 * spread]
    return float(inliers.mean()), spread


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
    last_sampled: float | None = None  # when the age network last saw this face
    frames: int = 0  # frames the face was seen in

    def add_age(self, age: AgeEstimate, timestamp: float) -> None:
        self.ages.append(age.age)
        self.last_sampled = timestamp

    def estimate(self) -> TrackEstimate:
        age, spread = fuse_ages(list(self.ages))
        return TrackEstimate(self.camera_id, self.track_id, age, spread, len(self.ages),
                             self.first_seen, self.last_seen, self.box, self.face_score)


class FaceTracker:
    """Tracks for one camera."""

    def __init__(self, camera_id: str, iou_threshold: float = 0.2, lost_after_s: float = 1.5, max_samples: int = 100):
        self.camera_id = camera_id
        self.iou_threshold = iou_threshold
        self.lost_after_s = lost_after_s
        self.max_samples = max_samples
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, timestamp: float, faces: list[Face]) -> tuple[list[Track], list[Track]]:
        """Match this frame's faces to tracks: (the track of each face, in order; the tracks that have now ended).

        Ages are added afterwards (`Track.add_age`), for the faces the inference budget picks."""
        matched: list[Track | None] = [None] * len(faces)
        if self.tracks and faces:
            boxes = np.array([f.box for f in faces], np.float32)
            pairs = sorted(
                ((float(o), t, d) for t, track in enumerate(self.tracks)
                 for d, o in enumerate(iou(np.array(track.box, np.float32), boxes))),
                reverse=True,
            )
            used_tracks: set[int] = set()
            for overlap, t, d in pairs:
                if overlap < self.iou_threshold:
                    break
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
        ended = [t for t in self.tracks if timestamp - t.last_seen > self.lost_after_s]
        self.tracks = [t for t in self.tracks if t not in ended]
        return matched, ended

    def end_all(self) -> list[Track]:
        ended, self.tracks = self.tracks, []
        return ended
