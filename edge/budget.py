"""The inference budget: which faces the age network sees.

Detection runs on every frame, to keep the tracks right; ageing every face of
every frame is waste, because a customer's fused age settles after a handful
of good frames, and on a 2-core till PC the age network is most of the work.
Per track (customer):
  1. its first `min_samples` faces are aged back to back, whatever their
     quality, so the first decision (and any alert) comes from the same frames
     and as early as when every frame was aged;
  2. while the decision could still flip (the fused age within 3 standard
     errors of the challenge age), every face, up to `settle_samples`: these
     are the customers the check is for; a clear case gets at most
     `settle_rate_hz` good faces a second until it has twice `min_samples`;
  3. once settled, one good face every `recheck_interval_s`, so a swap of
     faces is noticed and the final estimate still spans the whole visit.
A face is good when it is large, confidently detected, frontal (the nose
between the eyes) and sharp. A track with no good face for `fallback_s` past
its due time takes the next face whatever its quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge.config import BudgetConfig
from edge.track import Track
from edge.types import Face

SPREAD_FLOOR = 3.0  # years: a few identical samples do not prove a certain age


@dataclass(frozen=True)
class FaceQuality:
    size: float  # the shorter side of the detector box, pixels
    score: float  # detector confidence
    turn: float  # |nose - eye midpoint| / eye distance, horizontally: 0 frontal, ~0.5+ profile
    sharpness: float  # variance of the Laplacian of the face at 48x48 grey


def face_quality(image_bgr: np.ndarray, face: Face) -> FaceQuality:
    x0, y0, x1, y1 = (int(round(v)) for v in face.box)
    region = image_bgr[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
    sharpness = 0.0  # a sliver at the picture's edge (models.min_face_px = 0 lets one through) shows nothing
    if region.size:
        grey = cv2.resize(cv2.cvtColor(region, cv2.COLOR_BGR2GRAY), (48, 48), interpolation=cv2.INTER_AREA)
        sharpness = float(cv2.Laplacian(grey, cv2.CV_32F).var())
    return FaceQuality(min(face.width, face.height), face.score, face.turn, sharpness)


def is_good(quality: FaceQuality, cfg: BudgetConfig) -> bool:
    return (quality.size >= cfg.min_face_px and quality.score >= cfg.min_score and quality.turn <= cfg.max_turn
            and quality.sharpness >= cfg.min_sharpness)


def decision_margin(track: Track, challenge_age: float) -> float:
    """How many standard errors the fused age lies from the challenge age (more samples move it less)."""
    estimate = track.estimate()
    return abs(estimate.age - challenge_age) / (max(estimate.spread, SPREAD_FLOOR) / math.sqrt(len(track.ages)))


def wants_age(track: Track, image_bgr: np.ndarray, face: Face, now: float, cfg: BudgetConfig,
              challenge_age: float, min_samples: int) -> bool:
    """Should this face of this track go to the age network now?"""
    samples = len(track.ages)
    if not cfg.enabled or samples < min_samples:
        return True
    certain = decision_margin(track, challenge_age) > 3
    if samples < cfg.settle_samples and not certain:
        return True  # the decision could still flip: every face until it cannot, or settle_samples
    settled = samples >= cfg.settle_samples or samples >= 2 * min_samples
    # an age far from the estimate (perhaps another face's now: edge/track.py SWAPPED_YEARS) has the next good face
    # aged at once, not at the next recheck a second on; a poor one only as ever, at the fallback
    due = 0.0 if track.doubted() else cfg.recheck_interval_s if settled else 1 / cfg.settle_rate_hz
    since = now - track.last_sampled
    if since < due:
        return False
    return since >= due + cfg.fallback_s or is_good(face_quality(image_bgr, face), cfg)
