"""CPU (or GPU) time per ResNet50 training step at several input sizes.

    python benchmarks/train_step.py [--sizes 224 128 64] [--batch 16] [--steps 5]

Random crops, the distribution head, the real optimizer; the first steps
(graph tracing/compilation) are excluded. Prints seconds per step and images
per second, and the ratio of each size to the first one, measured in the same
run; writes bench-out/train_step.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from training import quiet_import
    keras = quiet_import("keras")
    from training.model import build_model, loss_and_metric
    results = {}
    for size in args.sizes:
        model = build_model(size, "distribution")
        loss, metric = loss_and_metric("distribution")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=[metric])
        x = np.random.default_rng(0).uniform(0, 255, (args.batch, size, size, 3)).astype(np.float32)
        y = np.random.default_rng(1).uniform(1, 90, args.batch).astype(np.float32)
        model.train_on_batch(x, y)  # tracing / compilation
        model.train_on_batch(x, y)
        started = time.perf_counter()
        for _ in range(args.steps):
            model.train_on_batch(x, y)
        seconds = (time.perf_counter() - started) / args.steps
        results[size] = {"seconds_per_step": round(seconds, 3), "images_per_second": round(args.batch / seconds, 1)}
        base = results[args.sizes[0]]["seconds_per_step"]
        print(f"{size:4d} px, batch {args.batch}: {seconds:.3f} s/step, {args.batch / seconds:.1f} images/s, "
              f"{base / seconds:.1f}x faster than {args.sizes[0]} px", flush=True)
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    meta = {"backend": keras.backend.backend(), "cpus": os.cpu_count(), "batch": args.batch}
    (out / "train_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([f"{s} px" for s in results], [r["seconds_per_step"] for r in results.values()], color="#4477aa")
    ax.set_ylabel(f"seconds per step (batch {args.batch})")
    ax.set_title(f"ResNet50 training step, {meta['backend']}, {meta['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(out / "train_step.png", dpi=100)


if __name__ == "__main__":
    main()
