"""The small typed records that flow between the pipeline stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded BGR frame from a camera (OpenCV's channel order)."""

    camera_id: str
    index: int
    timestamp: float  # seconds; wall clock for live sources, media time for files
    image: np.ndarray
    read_at: float = field(default_factory=time.monotonic)  # when it was read, by the clock no one sets


@dataclass(frozen=True)
class Face:
    """A detected face in frame pixel coordinates."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    left_eye: tuple[float, float]  # the eye on the left of the image
    right_eye: tuple[float, float]
    nose: tuple[float, float] | None = None  # tip of the nose, where the detector gives it

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def turn(self) -> float:
        """How far the head is turned: |nose - eye midpoint| / eye distance, horizontally.
        About 0 facing the camera, 0.5 and more in profile; 0 when the detector gives no nose."""
        if self.nose is None:
            return 0.0
        (lx, ly), (rx, ry) = self.left_eye, self.right_eye
        return abs(self.nose[0] - (lx + rx) / 2) / max(((rx - lx) ** 2 + (ry - ly) ** 2) ** 0.5, 1e-6)


@dataclass(frozen=True)
class AgeEstimate:
    """What the age model said about one crop."""

    age: float
    spread: float | None = None  # model's own standard deviation, if it gives one


@dataclass
class TrackEstimate:
    """A track's fused age: what is published per customer."""

    camera_id: str
    track_id: int
    age: float
    spread: float
    samples: int
    first_seen: float
    last_seen: float
    box: tuple[float, float, float, float]
    face_score: float


@dataclass
class CameraStatus:
    camera_id: str
    state: str = "starting"  # starting | online | reconnecting | ended | failed
    frames: int = 0
    reconnects: int = 0
    last_error: str | None = None
    picture: str | None = None  # live | frozen | blank (edge.capture.PictureCheck); None before a frame or unchecked
    face_in_view: bool = False  # the last frame the camera's pipeline looked at showed a face (set by the pipeline)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CustomerView:
    """One customer as the POS may be told about them: a track seen in the latest frame."""

    track_id: int
    age: float | None  # fused age; None before the first age sample
    spread: float | None
    samples: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class TillView:
    """What one till's camera shows now; replaced whole after every frame, read by the POS desk."""

    camera_id: str
    frame_time: float
    customers: tuple[CustomerView, ...]
    transaction: str | None = None
    # when its frame was read (monotonic): how fresh it is, whatever the wall clock did meanwhile
    read_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Decision:
    """The answer to an age check."""

    decision: str  # challenge | no_challenge | no_face | not_aged | several_faces | camera_fault
    customers: tuple[CustomerView, ...]
    complete: bool  # False: answered at the deadline with fewer samples than the policy wants
    frame_time: float | None
