"""`tillsight data inspect`: what is in a labelled face folder, before training on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from training.data import GENDERS, RACES, load_faces, read_labels_counted, select, split_of
from training.metrics import BANDS, band_of


def inspect(data_dir: Path, labels_csv: Path | None, out: Path, limit: int | None = None,
            val_fraction: float = 0.1, input_size: int = 128, crop_margin: float = 0.0,
            test_fraction: float = 0.1) -> dict:
    from training.plots import plot_age_histogram, plot_sample_grid

    labels_file = labels_csv or data_dir / "labels.csv"
    every_label, repeated_rows = read_labels_counted(labels_file)
    labels = select(every_label, limit)
    faces = load_faces(data_dir, labels, input_size, crop_margin)
    ages = np.array([label.age for label in labels], np.float32)
    out.mkdir(parents=True, exist_ok=True)
    plot_age_histogram(ages, out / "age_histogram.png", f"{data_dir.name}: {len(labels)} labelled images")
    step = max(1, len(faces.labels) // 32)
    picked = list(range(0, len(faces.labels), step))[:32]
    plot_sample_grid([faces.crops[i] for i in picked], [f"{faces.labels[i].age:g}" for i in picked],
                     out / "sample_faces.png")
    splits = Counter(split_of(label.file_name, val_fraction, test_fraction) for label in faces.labels)
    report = {
        "data": str(data_dir),
        "labelled": len(labels),
        "repeated_rows_read_once": repeated_rows,  # the same file name and labels on several rows of labels_file
        "faces": len(faces.labels),
        "missing": faces.missing,
        "unreadable": faces.unreadable,
        "no_face": faces.no_face,
        "age": {"min": float(ages.min()), "median": float(np.median(ages)), "max": float(ages.max()),
                "mean": round(float(ages.mean()), 2), "under_18": int((ages < 18).sum())},
        "by_band": {band: int(sum(band_of(a) == band for a in ages)) for band in BANDS},
        "by_gender": _named_counts(labels, "gender", GENDERS),
        "by_race": _named_counts(labels, "race", RACES),
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction,
                  **{k: splits[k] for k in ("train", "val", "test")}},
        "plots": [str(out / "age_histogram.png"), str(out / "sample_faces.png")],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _named_counts(labels, attribute: str, names: dict) -> dict:
    counts = Counter(getattr(label, attribute) for label in labels)
    return {names.get(key, str(key)): value for key, value in sorted(counts.items(), key=lambda kv: str(kv[0]))
            if key is not None}


def print_report(report: dict) -> None:
    print(f"{report['data']}: {report['labelled']} labelled, {report['faces']} faces cropped, "
          f"{len(report['no_face'])} with no face found, {len(report['unreadable'])} unreadable, "
          f"{len(report['missing'])} missing")
    if report["repeated_rows_read_once"]:
        print(f"  {report['repeated_rows_read_once']} row(s) of the labels file repeat an earlier row as it was: read once")
    for kind in ("missing", "unreadable", "no_face"):
        names = report[kind]
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            print(f"  {kind}: {shown}")
    age = report["age"]
    print(f"ages: {age['min']:g} to {age['max']:g}, median {age['median']:g}, mean {age['mean']}, "
          f"{age['under_18']} under 18")
    print("by band: " + ", ".join(f"{band} {count}" for band, count in report["by_band"].items()))
    if report["by_gender"]:
        print("by gender: " + ", ".join(f"{k} {v}" for k, v in report["by_gender"].items()))
    if report["by_race"]:
        print("by race: " + ", ".join(f"{k} {v}" for k, v in report["by_race"].items()))
    split = report["split"]
    print(f"split (val fraction {split['val_fraction']}, test fraction {split['test_fraction']}): {split['train']} "
          f"train, {split['val']} validation, {split['test']} held-out test")
    print("plots: " + ", ".join(report["plots"]))
