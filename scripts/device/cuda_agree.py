#!/usr/bin/env python3
"""Do the daemon's CUDA sessions answer what its CPU session answers, and what does a new batch size cost?

    python3 scripts/device/cuda_agree.py DIR --faces VIDEO [--out FILE.json]

DIR holds age.onnx, age_fp16.onnx and age_int8.onnx (scripts/device/bench_models.py). Each setting loads
the model with the daemon's own loader (`edge.infer.AgeModel`, the CUDA provider options as given) and
ages real face crops from VIDEO (the repo's detector) at batch 64 and one at a time; the reference is the
fp32 file on the CPU. It prints, per setting: the providers ONNX Runtime really used, the largest and
mean difference in years from the reference, the largest difference between batch 64 and batch 1 (a
kernel choice that depends on the batch must not change an age), and the first and second call of a batch
size the session has not seen (cuDNN's exhaustive search runs on the first: what the daemon's warm-up
moves to its start). A difference over one year is marked DISAGREES and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

TOLERANCE_YEARS = 1.0
VARIANTS = {"age.onnx": "fp32", "age_fp16.onnx": "fp16", "age_int8.onnx": "int8"}
SETTINGS = [  # (label, file, providers, CUDA provider options; None: the daemon's default)
    ("cpu fp32 (reference)", "age.onnx", ["cpu"], None),
    ("cpu int8 (a till)", "age_int8.onnx", ["cpu"], None),
    ("cuda fp16 ORT default", "age_fp16.onnx", ["cuda"], {}),
    ("cuda fp16 heuristic", "age_fp16.onnx", ["cuda"], {"cudnn_conv_algo_search": "HEURISTIC"}),
    ("cuda fp16 daemon default", "age_fp16.onnx", ["cuda"], None),
    ("cuda fp32 daemon default", "age.onnx", ["cuda"], None),
    ("cuda int8 daemon default", "age_int8.onnx", ["cuda"], None),
    ("cuda daemon auto (fp16 made)", None, ["cuda"], None),  # what a store server serves: the shipped int8 file
]


def _ages(model, crops: np.ndarray) -> np.ndarray:
    return np.array([e.age for e in model.predict(crops)], np.float32)


def _first_and_second_call_ms(model, crops: np.ndarray, batch: int) -> tuple[float, float]:
    times = []
    for _ in range(2):
        started = time.perf_counter()
        model.predict(crops[:batch])
        times.append((time.perf_counter() - started) * 1000)
    return round(times[0], 1), round(times[1], 1)


def check(folder: Path, faces: Path, count: int = 64) -> list[dict]:
    from bench_models import _crops
    from edge.infer import AgeModel
    size = AgeModel(folder / "age_int8.onnx", ["cpu"]).info.input_size
    crops, source = _crops(count, size, faces)
    print(f"crops: {source}", flush=True)
    rows, reference = [], None
    for label, name, providers, cuda in SETTINGS:
        try:
            model = AgeModel(folder / name, providers, variant=VARIANTS[name], cuda_options=cuda) if name else \
                AgeModel.load("auto", providers, cuda_options=cuda)
        except Exception as exc:  # noqa: BLE001 - a setting that does not load is a row, not the end
            rows.append({"setting": label, "error": str(exc).splitlines()[0][:200]})
            print(f"{label:28s} failed: {rows[-1]['error']}", flush=True)
            continue
        whole = _ages(model, crops)
        alone = np.concatenate([_ages(model, crops[i:i + 1]) for i in range(len(crops))])
        first, second = _first_and_second_call_ms(model, crops, 37)  # a batch size this session has not run
        reference = whole if reference is None else reference
        row = {"setting": label, "variant": model.variant, "providers": model.providers, "mean_age": round(float(whole.mean()), 2),
               "max_diff_years": round(float(np.abs(whole - reference).max()), 3),
               "mean_diff_years": round(float(np.abs(whole - reference).mean()), 3),
               "batch64_vs_batch1_years": round(float(np.abs(whole - alone).max()), 3),
               "new_batch_first_call_ms": first, "new_batch_second_call_ms": second}
        row["agrees"] = row["max_diff_years"] <= TOLERANCE_YEARS and row["batch64_vs_batch1_years"] <= TOLERANCE_YEARS
        rows.append(row)
        print(f"{label:28s} {model.variant:5s} {model.providers[0]:22s} mean age {row['mean_age']:6.2f}  vs reference max "
              f"{row['max_diff_years']:.3f} mean {row['mean_diff_years']:.3f} y  batch 64 vs 1 "
              f"{row['batch64_vs_batch1_years']:.3f} y  new batch size: first call {first} ms, then {second} ms"
              + ("" if row["agrees"] else "  DISAGREES"), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--faces", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = check(args.folder, args.faces)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r.get("agrees", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
