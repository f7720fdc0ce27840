"""Decisions with a known risk: the probability that a customer is under the legal age.

Challenge 25 compares a point estimate with 25. The risk mode asks instead:
given what the model said, how likely is this customer under 18? The answer
comes from the model's measured errors: on a validation split, the residuals
(true age - estimated age) of the faces whose estimate fell in each band of
estimated ages (5-year bands). The table travels in the model's metadata
(`tillsight.residuals`), written by `tillsight eval --residuals-into`, and by
`tillsight ship` from the run's validation split, never from the held-out test
split it reports on (the risk mode's figures there score the test faces with
this very table); P(under legal age | estimate e) is the share of that band's
residuals r with e + r < legal age. The per-image residuals are used for the
fused estimate: fusing frames only narrows the error, so the risk is over-,
never under-stated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

KEY_RESIDUALS = "tillsight.residuals"
BIN_YEARS = 5
MIN_PER_BIN = 20  # a band with fewer residuals borrows its neighbours'
MAX_PER_BIN = 400  # stored quantiles per band (metadata stays small)


@dataclass(frozen=True)
class ResidualTable:
    """Residuals (true - estimated, years) by estimated-age band [i*5, i*5+5)."""

    residuals: tuple[tuple[float, ...], ...]

    @staticmethod
    def measure(estimated, true) -> "ResidualTable":
        estimated, true = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
        bins = np.clip((estimated // BIN_YEARS).astype(int), 0, None)
        rows = []
        for b in range(int(bins.max(initial=0)) + 1):
            near, spread = np.zeros(0), 0
            while near.size < MIN_PER_BIN and spread <= bins.max(initial=0):  # widen to the neighbours
                near = (true - estimated)[np.abs(bins - b) <= spread]
                spread += 1
            quantiles = np.quantile(near, np.linspace(0, 1, min(MAX_PER_BIN, near.size))) if near.size else near
            rows.append(tuple(round(float(q), 2) for q in quantiles))
        return ResidualTable(tuple(rows))

    def probability_under(self, estimate: float, legal_age: float) -> float:
        """P(true age < legal_age) for a customer estimated at `estimate`."""
        row = self.residuals[min(max(int(estimate // BIN_YEARS), 0), len(self.residuals) - 1)]
        if not row:
            return 1.0  # nothing measured here: assume the worst
        return float(np.mean(estimate + np.asarray(row) < legal_age))

    def to_metadata(self) -> str:
        return json.dumps({"bin_years": BIN_YEARS, "residuals": self.residuals}, separators=(",", ":"))

    @staticmethod
    def from_metadata(meta: dict) -> "ResidualTable | None":
        text = meta.get(KEY_RESIDUALS)
        if text is None:
            return None
        try:
            body = json.loads(text)
            if body["bin_years"] != BIN_YEARS:
                return None
            rows = tuple(tuple(float(r) for r in row) for row in body["residuals"])
        except (ValueError, KeyError, TypeError):
            return None
        # a table that cannot answer is no table (risk mode then refuses the model, in one line): NaN answers
        # "never under age" (alerts silently off), no rows an IndexError in the pipeline, and an empty row is
        # what measure() makes of no faces at all
        if not rows or not all(rows) or not np.isfinite([r for row in rows for r in row]).all():
            return None
        return ResidualTable(rows)
