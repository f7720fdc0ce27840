"""Policy: when does a customer need an ID check ("Challenge 25")."""

from __future__ import annotations

from edge.types import Decision, TillView, TrackEstimate


def needs_id_check(estimate: TrackEstimate, challenge_age: float, min_samples: int) -> bool:
    """A customer whose fused age is under the challenge age must be asked for ID.

    The challenge age itself (25 where the law says 18) is the safety margin
    for estimation error, so the estimate is compared as it is; we only wait
    for `min_samples` frames so one bad frame cannot raise an alert alone.
    """
    return estimate.samples >= min_samples and estimate.age < challenge_age


def decide(view: TillView | None, challenge_age: float, min_samples: int, at_deadline: bool) -> Decision | None:
    """The answer to an age check about the customer at the till now, or None to wait for more frames.

    One customer seen long enough (`min_samples` ages): challenge or not. Nobody: wait, then `no_face`.
    Several people at the till: `several_faces` once each has been seen long enough (the cashier
    decides who is buying; each face's figures go with it). At the deadline: what there is,
    marked incomplete."""
    customers = view.customers if view else ()
    aged = tuple(c for c in customers if c.age is not None)
    ready = bool(customers) and all(c.samples >= min_samples for c in customers)
    if not ready and not at_deadline:
        return None
    frame_time = view.frame_time if view else None
    if not aged:
        return Decision("no_face", (), True, frame_time)
    if len(customers) > 1:
        return Decision("several_faces", aged, ready, frame_time)
    verdict = "challenge" if aged[0].age < challenge_age else "no_challenge"
    return Decision(verdict, aged, ready, frame_time)
