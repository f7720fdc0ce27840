"""Age-estimation figures: MAE overall, by band, by group, and the Challenge 25 rates."""

from __future__ import annotations

import numpy as np

BANDS = {"0-12": (0, 13), "13-17": (13, 18), "18-24": (18, 25), "25-29": (25, 30), "30-44": (30, 45),
         "45-59": (45, 60), "60+": (60, 1000)}


def band_of(age: float) -> str:
    return next(name for name, (low, high) in BANDS.items() if low <= age < high)


def _mae(errors: np.ndarray) -> float | None:
    return round(float(np.mean(errors)), 3) if errors.size else None


def _share(mask: np.ndarray) -> float | None:
    return round(float(np.mean(mask)), 4) if mask.size else None


def age_metrics(true, predicted, challenge_age: float = 25.0, genders=None, races=None,
                gender_names: dict | None = None, race_names: dict | None = None) -> dict:
    true = np.asarray(true, np.float64)
    predicted = np.asarray(predicted, np.float64)
    errors = np.abs(predicted - true)
    flagged = predicted < challenge_age
    result = {
        "mae": _mae(errors),
        "mae_by_band": {band: _mae(errors[(true >= low) & (true < high)]) for band, (low, high) in BANDS.items()},
        "n_by_band": {band: int(np.count_nonzero((true >= low) & (true < high))) for band, (low, high) in BANDS.items()},
        "challenge25": {
            "minors_13_17_flagged": _share(flagged[(true >= 13) & (true < 18)]),
            "adults_25plus_challenged": _share(flagged[true >= 25]),
            "adults_30plus_challenged": _share(flagged[true >= 30]),
        },
    }
    for key, groups, names in (("gender", genders, gender_names), ("race", races, race_names)):
        table, counts = {}, {}
        if groups is not None:
            groups = list(groups)
            for group in sorted({g for g in groups if g is not None}):
                mask = np.array([g == group for g in groups])
                name = (names or {}).get(group, str(group))
                table[name], counts[name] = _mae(errors[mask]), int(np.count_nonzero(mask))
        result[f"mae_by_{key}"], result[f"n_by_{key}"] = table, counts
    return result
