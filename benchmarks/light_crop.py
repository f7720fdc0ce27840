"""How to crop for the light age model: MAE on the UTKFace validation split per crop.

    python benchmarks/light_crop.py [--limit N]

Every photo is detected once (the daemon's detector, portrait framing as in
`tillsight eval`); each candidate crop is cut from the same detections and
scored with the light model (`tillsight models fetch light`). Box-centred
crops with a growing margin against crops that put the eyes' midpoint at a
fixed height (dlib's own chips put it at 0.30), which is what the light model
was trained on. The chosen crop is stored in the model's metadata
(edge/tiers.py). Prints a table, writes bench-out/light_crop.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.crop import crop_face  # noqa: E402
from edge.infer import AgeModel  # noqa: E402
from training.data import load_face_sets, read_labels, select, split_of  # noqa: E402
from training.metrics import age_metrics  # noqa: E402

SHARED = Path(os.environ.get("TILLSIGHT_SHARED", REPO.parent / "shared"))
CROPS = {  # name -> (margin, eye_y); eye_y None = centred on the detector box
    "box, margin 0": (0.0, None), "box, margin 0.1": (0.1, None), "box, margin 0.2": (0.2, None),
    "box, margin 0.3": (0.3, None), "eyes at 0.25": (0.0, 0.25), "eyes at 0.30": (0.0, 0.30),
    "eyes at 0.35": (0.0, 0.35), "eyes at 0.30, margin 0.05": (0.05, 0.30),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "utkface")
    parser.add_argument("--limit", type=int, help="a deterministic subset of the validation split")
    args = parser.parse_args()
    model = AgeModel.load("light", ["cpu"])
    size = model.info.input_size
    labels = select([l for l in read_labels(args.data / "labels.csv") if split_of(l.file_name, 0.1) == "val"],
                    args.limit)
    croppers = [lambda image, face, m=m, e=e: crop_face(image, face, size, m, e) for m, e in CROPS.values()]
    sets = load_face_sets(args.data, labels, croppers)
    results = {}
    for name, faces in zip(CROPS, sets):
        predicted = np.array([e.age for e in model.predict(faces.crops)])
        metrics = age_metrics(faces.ages, predicted)
        results[name] = {"mae": metrics["mae"], **metrics["challenge25"], "n": len(faces.labels)}
    print(f"light model, {len(labels)} UTKFace validation photos, {results[name]['n']} faces")
    print(f"{'crop':<28} {'MAE':>6} {'minors 13-17 flagged':>22} {'adults 30+ challenged':>22}")
    for name, row in results.items():
        print(f"{name:<28} {row['mae']:>6.2f} {100 * row['minors_13_17_flagged']:>21.1f}% "
              f"{100 * row['adults_30plus_challenged']:>21.1f}%")
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    (out / "light_crop.json").write_text(json.dumps(results, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(list(results), [r["mae"] for r in results.values()], color="#4477aa")
    ax.invert_yaxis()
    ax.set_xlabel("MAE on UTKFace validation faces (years)")
    ax.set_title("light age model: MAE by crop")
    fig.tight_layout()
    fig.savefig(out / "light_crop.png", dpi=100)
    print(f"wrote {out / 'light_crop.png'}")


if __name__ == "__main__":
    main()
