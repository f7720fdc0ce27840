"""`tillsight eval`: the full edge pipeline (detector, crop, ONNX age model) over a labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.detect import FaceDetector
from edge.infer import AgeModel
from training.data import GENDERS, RACES, load_faces, read_labels, select, split_of
from training.metrics import age_metrics


def evaluate(model_path: Path, data_dir: Path, labels_csv: Path | None, split: str = "all",
             val_fraction: float = 0.1, limit: int | None = None, out: Path | None = None,
             challenge_age: float = 25.0, progress: bool = True) -> dict:
    model = AgeModel(model_path, ["cuda", "cpu"])
    labels = read_labels(labels_csv or data_dir / "labels.csv")
    if split != "all":
        labels = [label for label in labels if split_of(label.file_name, val_fraction) == split]
    labels = select(labels, limit)
    faces = load_faces(data_dir, labels, model.info.input_size, model.info.crop_margin,
                       FaceDetector(min_face_px=0), progress=progress)
    predicted = np.array([e.age for e in model.predict(faces.crops)], np.float64) if faces.labels else np.zeros(0)
    report = {
        "model": str(model_path),
        "provider": model.providers[0],
        "data": str(data_dir),
        "split": split,
        "n": len(labels),
        "n_no_face": len(faces.no_face),
        "n_unreadable": len(faces.unreadable) + len(faces.missing),
        "n_scored": len(faces.labels),
        **age_metrics(faces.ages, predicted, challenge_age,
                      [l.gender for l in faces.labels], [l.race for l in faces.labels], GENDERS, RACES),
    }
    if out is not None and faces.labels:
        from training.plots import plot_error_by_band, plot_predicted_vs_true
        out.mkdir(parents=True, exist_ok=True)
        plot_error_by_band(report["mae_by_band"], out / "error_by_band.png")
        plot_predicted_vs_true(faces.ages, predicted, out / "predicted_vs_true.png")
        (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def print_eval(report: dict) -> None:
    c25 = report["challenge25"]
    print(f"{report['model']} on {report['data']} ({report['split']}): {report['n']} images, "
          f"{report['n_no_face']} no face, {report['n_scored']} scored, MAE {report['mae']} years")
    print("MAE by band: " + ", ".join(f"{b} {v}" for b, v in report["mae_by_band"].items()))
    for key in ("mae_by_gender", "mae_by_race"):
        if report[key]:
            print(f"{key.replace('_', ' ')}: " + ", ".join(f"{b} {v}" for b, v in report[key].items()))
    print(f"Challenge 25: minors 13-17 flagged {_pct(c25['minors_13_17_flagged'])}, adults 25+ challenged "
          f"{_pct(c25['adults_25plus_challenged'])}, adults 30+ challenged {_pct(c25['adults_30plus_challenged'])}")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
