"""Policy: when does a customer need an ID check.

Two modes (`policy.mode`):
    challenge25  the default, the retail practice: challenge anyone whose fused
                 age is under `challenge_age` (25 where the law says 18; the
                 gap is the margin for estimation error).
    risk         challenge when the probability that the customer is under
                 `legal_age` exceeds `max_risk`, from the model's measured
                 errors (edge/risk.py). A retailer picks the operating point
                 from `tillsight eval`'s curve of minors flagged against adults
                 challenged.
Either way a track is judged only after `min_samples` ages, so one bad frame
cannot raise an alert alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from edge.errors import ModelError
from edge.risk import KEY_RESIDUALS, ResidualTable
from edge.types import Decision, TillView, TrackEstimate


@dataclass(frozen=True)
class Policy:
    mode: str = "challenge25"
    challenge_age: float = 25.0
    legal_age: float = 18.0
    max_risk: float = 0.02
    min_samples: int = 3
    residuals: ResidualTable | None = None  # the age model's measured errors, when it carries them

    def risk(self, age: float) -> float | None:
        """P(under the legal age) for this estimate; None when the model carries no residual table."""
        return None if self.residuals is None else self.residuals.probability_under(age, self.legal_age)

    @cached_property
    def boundary_age(self) -> float:
        """The estimate at which the decision flips (the inference budget samples more near it)."""
        if self.mode != "risk":
            return self.challenge_age
        return next((a / 2 for a in range(0, 241) if not self.challenge(a / 2)), 120.0)

    def challenge(self, age: float) -> bool:
        if self.mode == "risk":
            return self.risk(age) > self.max_risk
        return age < self.challenge_age


def build_policy(config, model_metadata: dict) -> Policy:
    """The configured policy, with the age model's residual table; risk mode needs one (one-line error)."""
    residuals = ResidualTable.from_metadata(model_metadata)
    if config.mode == "risk" and residuals is None:
        carried = " (its table cannot be used: no rows, an empty row, or a value that is no number)" \
            if KEY_RESIDUALS in model_metadata else ""
        raise ModelError(f"policy.mode = \"risk\" needs an age model that carries its measured errors{carried}: "
                         "tillsight eval --model M --data DIR --split val --residuals-into M_WITH_RISK.onnx")
    return Policy(config.mode, config.challenge_age, config.legal_age, config.max_risk, config.min_samples, residuals)


def needs_id_check(estimate: TrackEstimate, policy: Policy) -> bool:
    """A customer seen long enough whom the policy would challenge."""
    return estimate.samples >= policy.min_samples and policy.challenge(estimate.age)


def decide(view: TillView | None, policy: Policy, at_deadline: bool) -> Decision | None:
    """The answer to an age check about the customer at the till now, or None to wait for more frames.

    One customer seen long enough (`min_samples` ages): challenge or not. Nobody: wait, then `no_face`; one
    face with no age by the deadline, or fewer than `min_samples` that would not challenge: `not_aged` (with
    the ages so far).
    Several people at the till: `several_faces` once each has been seen long enough (the cashier
    decides who is buying; each face's figures go with it). At the deadline: what there is,
    marked incomplete."""
    customers = view.customers if view else ()
    aged = tuple(c for c in customers if c.age is not None)
    ready = bool(customers) and all(c.samples >= policy.min_samples for c in customers)
    if not ready and not at_deadline:
        return None
    frame_time = view.frame_time if view else None
    if not customers:
        return Decision("no_face", (), True, frame_time)
    if len(customers) > 1:  # the faces aged so far go with it
        return Decision("several_faces", aged, ready, frame_time)
    if not aged:  # someone is there, but the age model has not aged them (failing, or far behind): never no_face
        return Decision("not_aged", (), False, frame_time)
    if policy.challenge(aged[0].age):
        return Decision("challenge", aged, ready, frame_time)
    # no_challenge lets the sale go on without the cashier's own judgement: never on fewer than min_samples ages
    # (one or two, of a customer walking in, answered at the deadline); a challenge needs no more to be safe
    return Decision("no_challenge" if ready else "not_aged", aged, ready, frame_time)
