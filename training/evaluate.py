"""`tillsight eval`: the full edge pipeline (detector, crop, ONNX age model) over a labelled folder.

With a second model (`--compare`), both are scored on the very same detected
faces (each cut with its own crop), so the table and plot show what one buys
over the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.detect import FaceDetector
from edge.infer import AgeModel
from training.data import GENDERS, RACES, FaceSet, load_face_sets, read_labels, select, split_of
from training.metrics import age_metrics


def evaluate(model: str | Path | None, data_dir: Path, labels_csv: Path | None, split: str = "all",
             val_fraction: float = 0.1, limit: int | None = None, out: Path | None = None,
             challenge_age: float = 25.0, progress: bool = True, compare: str | Path | None = None) -> dict:
    """The report of `model` (a tier or a file); with `compare`, its report under 'compared_with'."""
    models = [AgeModel.load(m, ["cuda", "cpu"]) for m in ([model, compare] if compare is not None else [model])]
    labels = read_labels(labels_csv or data_dir / "labels.csv")
    if split != "all":
        labels = [label for label in labels if split_of(label.file_name, val_fraction) == split]
    labels = select(labels, limit)
    face_sets = load_face_sets(data_dir, labels, [m.info.crop for m in models], FaceDetector(min_face_px=0),
                               progress=progress)
    predictions = [np.array([e.age for e in m.predict(faces.crops)], np.float64) if faces.labels else np.zeros(0)
                   for m, faces in zip(models, face_sets)]
    reports = [_report(m, faces, predicted, data_dir, split, len(labels), challenge_age)
               for m, faces, predicted in zip(models, face_sets, predictions)]
    report = reports[0]
    if len(reports) > 1:
        report["compared_with"] = reports[1]
    if out is not None and face_sets[0].labels:
        from training.plots import plot_error_by_band, plot_predicted_vs_true
        out.mkdir(parents=True, exist_ok=True)
        plot_error_by_band({_name(r): r["mae_by_band"] for r in reports}, out / "error_by_band.png")
        plot_predicted_vs_true(face_sets[0].ages, predictions[0], out / "predicted_vs_true.png")
        (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


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
        "n_unreadable": len(faces.unreadable) + len(faces.missing),
        "n_scored": len(faces.labels),
        **age_metrics(faces.ages, predicted, challenge_age,
                      [l.gender for l in faces.labels], [l.race for l in faces.labels], GENDERS, RACES),
    }


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


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
