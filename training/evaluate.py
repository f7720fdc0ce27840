"""`tillsight eval`: the full edge pipeline (detector, crop, ONNX age model) over a labelled folder.

With a second model (`--compare`), both are scored on the very same detected
faces (each cut with its own crop), so the table and plot show what one buys
over the other.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from edge.infer import AgeModel
from training.data import (GENDERS, RACES, FaceSet, Label, copies_of_training, iter_image_bytes, load_face_sets,
                           read_labels, sample_fraction, select, split_of)
from edge.risk import KEY_RESIDUALS, ResidualTable
from training.metrics import age_metrics

LEGAL_AGE = 18.0  # the risk mode's operating points: P(under 18), as `policy.legal_age` defaults


def cross_fitted_risks(true: np.ndarray, predicted: np.ndarray, names: list[str],
                       legal_age: float = LEGAL_AGE) -> np.ndarray:
    """P(under legal_age) of each face from a residual table measured on the other half of the faces (halves by
    a hash of the file name): a table scored on the faces it was measured on flatters the risk mode (at a
    maximum risk of 0.5 %, 100 % of minors flagged in-sample against 96.5 % out of it, shipped ResNet50)."""
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    first = np.array([sample_fraction(name) < 0.5 for name in names], bool)
    risks = np.ones(len(true))
    for half in (first, ~first):
        table = ResidualTable.measure(predicted[~half], true[~half])
        risks[half] = [table.probability_under(p, legal_age) for p in predicted[half]]
    return risks


def operating_points(true: np.ndarray, predicted: np.ndarray, risks: np.ndarray,
                     legal_age: float = LEGAL_AGE) -> dict:
    """Minors (13-17) flagged against adults (25+) challenged, for each mode over its setting:
    Challenge N for N from 16 to 40, and the risk mode (each face's `risks`) for a maximum risk from 0.1 % to
    50 %."""
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    minors, adults = (true >= 13) & (true < legal_age), true >= 25

    def point(flagged: np.ndarray, setting: float) -> dict:
        return {"setting": round(float(setting), 4),
                "minors_flagged": round(float(flagged[minors].mean()), 4) if minors.any() else None,
                "adults_challenged": round(float(flagged[adults].mean()), 4) if adults.any() else None}

    risks = np.asarray(risks, np.float64)
    return {"challenge_age": [point(predicted < n, n) for n in np.arange(16, 40.5, 1.0)],
            "risk": [point(risks > r, r) for r in np.geomspace(0.001, 0.5, 25)]}


def write_residuals(model_path: Path, table: ResidualTable, out: Path) -> None:
    """A copy of the ONNX model with its residual table in the metadata."""
    import onnx
    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key != KEY_RESIDUALS]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=KEY_RESIDUALS, value=table.to_metadata())
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))


def evaluate(model: str | Path | None, data_dir: Path, labels_csv: Path | None, split: str = "all",
             val_fraction: float = 0.1, limit: int | None = None, out: Path | None = None,
             challenge_age: float = 25.0, progress: bool = True, compare: str | Path | None = None,
             residuals_into: Path | None = None, test_fraction: float = 0.1,
             residuals_split: str | None = None) -> dict:
    """The report of `model` (a tier or a file); with `compare`, its report under 'compared_with'.

    `residuals_into`: write a copy of the model that carries its measured errors (edge/risk.py), which the risk
    policy needs: measured on these faces, and the risk mode's operating points cross-fitted on them.
    `residuals_split` ('val' while `split` is 'test': `tillsight ship`): measure that table on the other split's
    faces instead (`limit` of them too; without the photos whose bytes are one of `split`'s), and score the
    operating points with it: out of sample, the table exactly as it will be served."""
    if residuals_split == split:
        residuals_split = None
    if residuals_split is not None and {split, residuals_split} != {"val", "test"}:
        raise ValueError(f"a residual table from {residuals_split!r} for figures on {split!r}: val and test only")
    models = [AgeModel.load(m, ["cuda", "cpu"]) for m in ([model, compare] if compare is not None else [model])]
    pool = read_labels(labels_csv or data_dir / "labels.csv")
    copies = copies_of_training(data_dir, pool, val_fraction, test_fraction) if split not in ("all", "train") \
        else set()
    in_split = split_labels(pool, split, val_fraction, test_fraction, copies)
    labels = select(in_split, limit)
    face_sets = load_face_sets(data_dir, labels, [m.info.crop for m in models],
                               progress=progress)
    predictions = [_ages(m, faces) for m, faces in zip(models, face_sets)]
    reports = [_report(m, faces, predicted, data_dir, split, len(labels), challenge_age)
               for m, faces, predicted in zip(models, face_sets, predictions)]
    report = reports[0]
    # this split's copies only: `copies` holds validation's and test's together
    report["copies_of_training_left_out"] = sum(split_of(name, val_fraction, test_fraction) == split for name in copies)
    if len(reports) > 1:
        report["compared_with"] = reports[1]
        report["agreement"] = agreement(face_sets, predictions)
    table = None
    if residuals_split is not None:
        table, report["residual_table"] = _table_of_split(models[0], data_dir, pool, residuals_split, in_split,
                                                          val_fraction, test_fraction, limit, copies, progress)
    if face_sets[0].labels:
        ages, names = face_sets[0].ages, [l.file_name for l in face_sets[0].labels]
        if table is None:
            table = ResidualTable.measure(predictions[0], ages)
            # the model's own table was measured on these very faces (`eval --residuals-into`): scored on them,
            # it would flatter the risk mode
            risks = cross_fitted_risks(ages, predictions[0], names)
            source = "cross-fitted: each half of the faces scored with the other's"
        else:
            risks = np.array([table.probability_under(p, LEGAL_AGE) for p in predictions[0]])
            source = (f"the table of {report['residual_table']['n_scored']} "
                      f"{'validation' if residuals_split == 'val' else 'test'} faces")
        report["operating_points"] = operating_points(ages, predictions[0], risks)
        report["operating_points"]["risk_table"] = source
        if residuals_into is not None and all(table.residuals):  # an empty row: measured on no face
            write_residuals(models[0].path, table, residuals_into)
            report["residuals_into"] = str(residuals_into)
    if out is not None and face_sets[0].labels:
        from training.plots import plot_error_by_band, plot_operating_points, plot_predicted_vs_true
        out.mkdir(parents=True, exist_ok=True)
        plot_error_by_band({_name(r): r["mae_by_band"] for r in reports}, out / "error_by_band.png")
        plot_predicted_vs_true(face_sets[0].ages, predictions[0], out / "predicted_vs_true.png")
        plot_operating_points(report["operating_points"], out / "operating_points.png")
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        write_predictions(face_sets, predictions, out / "predictions.csv")
    return report


def write_predictions(face_sets: list[FaceSet], predictions: list[np.ndarray], path: Path) -> None:
    """A row per face scored: file_name, real_age, age (and compared_age with --compare; both models are given
    the same detected faces, so a cell is empty only should one have scored a face the other did not): every
    figure of the report can be recomputed, and the worst faces looked at."""
    rows: dict[str, list[str]] = {}
    for column, (faces, predicted) in enumerate(zip(face_sets, predictions)):
        for label, age in zip(faces.labels, predicted):
            row = rows.setdefault(label.file_name, [label.file_name, f"{label.age:g}"] + [""] * len(face_sets))
            row[2 + column] = f"{age:.3f}"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file_name", "real_age", "age", "compared_age"][:2 + len(face_sets)])
        writer.writerows(rows.values())


def split_labels(labels: list[Label], split: str, val_fraction: float, test_fraction: float,
                 copies: set[str]) -> list[Label]:
    """The labels of `split` ('all': every one), less `copies` (copies_of_training: the validation and test photos
    whose bytes are a training photo's)."""
    if split == "all":
        return labels
    return [label for label in labels if split_of(label.file_name, val_fraction, test_fraction) == split
            and label.file_name not in copies]


def copies_among(data_dir: Path, names: list[str], others: list[str]) -> set[str]:
    """The `names` whose bytes are also one of `others`' (UTKFace holds some pictures under two names)."""
    digests = {name: hashlib.sha1(data).digest() for name, data in iter_image_bytes(data_dir, {*names, *others})}
    theirs = {digests[name] for name in others if name in digests}
    return {name for name in names if digests.get(name) in theirs}


def _table_of_split(model: AgeModel, data_dir: Path, pool: list[Label], split: str, scored: list[Label],
                    val_fraction: float, test_fraction: float, limit: int | None, copies: set[str],
                    progress: bool) -> tuple[ResidualTable, dict]:
    """The residual table of `model` on `split`'s faces, and what it was measured on. Without the photos whose
    bytes are one of the `scored` split's (all of it, not only the --limit scored): a picture in both would be
    scored with a table that holds its own error."""
    labels = split_labels(pool, split, val_fraction, test_fraction, copies)
    shared = copies_among(data_dir, [l.file_name for l in labels], [l.file_name for l in scored])
    labels = select([l for l in labels if l.file_name not in shared], limit)
    (faces,) = load_face_sets(data_dir, labels, [model.info.crop], progress=progress)
    predicted = _ages(model, faces)
    return ResidualTable.measure(predicted, faces.ages), {
        "split": split, "n": len(labels), "n_no_face": len(faces.no_face),
        "n_unreadable": len(faces.unreadable) + len(faces.missing), "n_scored": len(faces.labels),
        "copies_of_training_left_out": sum(split_of(name, val_fraction, test_fraction) == split for name in copies),
        "copies_of_scored_split_left_out": len(shared),
        "mae": age_metrics(faces.ages, predicted)["mae"]}


def _ages(model: AgeModel, faces: FaceSet) -> np.ndarray:
    return np.array([e.age for e in model.predict(faces.crops)], np.float64) if faces.labels else np.zeros(0)


def agreement(face_sets: list[FaceSet], predictions: list[np.ndarray]) -> dict | None:
    """How far the model's estimates are from the compared model's, face by face; None when the two
    were scored on different faces (different crops can find different faces)."""
    names = [[label.file_name for label in faces.labels] for faces in face_sets]
    if names[0] != names[1] or not names[0]:
        return None
    shift = np.abs(predictions[0] - predictions[1])
    worst = int(np.argmax(shift))
    return {"n": len(shift), "mean_abs_diff": round(float(shift.mean()), 4),
            "p99_abs_diff": round(float(np.percentile(shift, 99)), 3), "over_3_years": int(np.count_nonzero(shift > 3)),
            "max_abs_diff": round(float(shift[worst]), 3), "max_abs_diff_file": names[0][worst]}


def _report(model: AgeModel, faces: FaceSet, predicted: np.ndarray, data_dir: Path, split: str, n: int,
            challenge_age: float) -> dict:
    return {
        "model": str(model.path),
        "tier": model.tier,
        "provider": model.providers[0],
        "data": str(data_dir),
        "split": split,
        "n": n,
        "n_no_face": len(faces.no_face),
        "n_unreadable": len(faces.unreadable) + len(faces.missing),  # the missing ones too, as ever
        "n_missing": len(faces.missing),
        "n_scored": len(faces.labels),
        **age_metrics(faces.ages, predicted, challenge_age,
                      [l.gender for l in faces.labels], [l.race for l in faces.labels], GENDERS, RACES),
    }


def nothing_scored(report: dict) -> str | None:
    """Why no face was scored (a wrong --data folder, labels for other files, an empty split), in one line; None
    if some were: a report of no face has no figure, and --residuals-into wrote nothing."""
    if report["n_scored"]:
        return None
    return (f"no face to evaluate in {report['data']} (--split {report['split']}: {report['n']} labelled images): "
            f"{report['n_missing']} missing, {report['n_unreadable'] - report['n_missing']} unreadable, "
            f"{report['n_no_face']} with no face found")


def _name(report: dict) -> str:
    return f"{Path(report['model']).name} ({report['tier']}), MAE {report['mae']}"


def print_eval(report: dict) -> None:
    print(f"{report['model']} on {report['data']} ({report['split']}): {report['n']} images, "
          f"{report['n_no_face']} no face, {report['n_scored']} scored")
    reports = [report] + ([report["compared_with"]] if "compared_with" in report else [])
    rows = [("model", [f"{Path(r['model']).name} ({r['tier']})" for r in reports]),
            ("MAE (years)", [r["mae"] for r in reports])]
    rows += [(f"MAE {band}", [r["mae_by_band"][band] for r in reports]) for band in report["mae_by_band"]]
    for key in ("mae_by_gender", "mae_by_race"):
        rows += [(f"MAE {group}", [r[key].get(group) for r in reports]) for group in report[key]]
    for key, title in (("minors_13_17_flagged", "Challenge 25: minors 13-17 flagged"),
                       ("adults_25plus_challenged", "Challenge 25: adults 25+ challenged"),
                       ("adults_30plus_challenged", "Challenge 25: adults 30+ challenged")):
        rows.append((title, [_pct(r["challenge25"][key]) for r in reports]))
    width = max(len(title) for title, _ in rows)
    for title, values in rows:
        print(f"{title:<{width}}  " + "  ".join(f"{'n/a' if v is None else v!s:>28}" for v in values))
    if report.get("agreement"):
        shift = report["agreement"]
        print(f"the two models on the same {shift['n']} faces: estimates apart by {shift['mean_abs_diff']} years "
              f"on average, {shift['p99_abs_diff']} at the 99th percentile, {shift['max_abs_diff']} at most "
              f"({shift['max_abs_diff_file']}); {shift['over_3_years']} faces apart by more than 3 years")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
