"""Policy: when does a customer need an ID check ("Challenge 25")."""

from __future__ import annotations

from edge.types import TrackEstimate


def needs_id_check(estimate: TrackEstimate, challenge_age: float, min_samples: int) -> bool:
    """A customer whose fused age is under the challenge age must be asked for ID.

    The challenge age itself (25 where the law says 18) is the safety margin
    for estimation error, so the estimate is compared as it is; we only wait
    for `min_samples` frames so one bad frame cannot raise an alert alone.
    """
    return estimate.samples >= min_samples and estimate.age < challenge_age
