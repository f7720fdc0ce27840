#!/usr/bin/env python3
"""Rehearse the CUDA benchmark's chain of device calls on this machine, without a GPU (CUDA-BENCH.md).

Each call gets a fresh copy of what the device tool sends (tracked and untracked-not-ignored files, plus
that call's carried .device/cudaK folder, size checked against the 64 MiB limit) and runs the same
command as on the device, `PYTHON scripts/device/cuda_device.py [VERB]`, with TS_DEVICE_ROOT pointing
at a scratch folder instead of /tmp (which other work on a shared machine uses).

    python3 scripts/device/pack_cuda_bench.py --python-version 3.11 --into .device/rehearse-cp311 \\
        --wheel onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl
    python3 scripts/device/rehearse_cuda_bench.py --packed .device/rehearse-cp311 --python VENV/bin/python

PYTHON: a Python of the same minor version as the packed wheels, with numpy, onnx, opencv-python-headless,
matplotlib and the CPU onnxruntime installed (as on the device; it is uninstalled by the assemble step).
The benchmarks run with tiny budgets here (arguments after `--` of each verb).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20
QUICK = {"speed": ["--", "--batches", "1,8", "--cpu-batches", "1", "--point-seconds", "0.3"],
         "e2e": ["--", "--cameras", "2", "--seconds", "5"],
         "tail": ["--", "--cameras", "2", "--seconds", "5"],
         "recheck": ["--", "--batches", "8", "--point-seconds", "0.3", "--cameras", "2", "--seconds", "5"]}


def tree_copy(target: Path) -> int:
    listing = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.split(b"\0")
    total = 0
    for raw in listing:
        if not raw:
            continue
        source = REPO / os.fsdecode(raw)
        if source.is_file():
            dest = target / os.fsdecode(raw)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
            total += source.stat().st_size
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", type=Path, default=REPO / ".device", help="the folder holding cuda1..cudaN")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ts-rehearsal"))
    parser.add_argument("--verbs", default="speed,e2e",
                        help="the last carrying call's verb, then one more call per further verb (CUDA-BENCH.md: "
                             "speed,e2e; the recheck after the first run: recheck)")
    parser.add_argument("--keep-carried", action="store_true",
                        help="leave earlier calls' carried folders in the copy (the device keeps ignored files "
                             "while warm); default: each call sees only its own, the stricter case")
    args = parser.parse_args()
    packed = args.packed if args.packed.is_absolute() else REPO / args.packed
    calls = sorted(int(p.name[4:]) for p in packed.glob("cuda[0-9]*"))
    if not calls:
        raise SystemExit(f"nothing packed in {packed}")
    probe = subprocess.run([args.python, "-c", "import importlib.metadata as m; print(m.version('onnxruntime'))"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if probe.returncode != 0:  # the assemble step of an earlier rehearsal uninstalled it, as on the device
        raise SystemExit(f"{args.python} has no CPU onnxruntime (the device has 1.30): "
                         f"{args.python} -m pip install onnxruntime==1.30.0")
    shutil.rmtree(args.root, ignore_errors=True)
    verbs = args.verbs.split(",")
    plan = [(k, verbs[0] if k == calls[-1] else "") for k in calls] + [
        (calls[-1] + 1 + i, verb) for i, verb in enumerate(verbs[1:])]
    copy = args.root / "repo"
    for k, verb in plan:
        if copy.exists() and not args.keep_carried:
            shutil.rmtree(copy)
        copy.mkdir(parents=True, exist_ok=True)
        tree = tree_copy(copy)
        carried = 0
        if (packed / f"cuda{k}").is_dir():
            shutil.copytree(packed / f"cuda{k}", copy / ".device" / f"cuda{k}", dirs_exist_ok=True)
            carried = sum(p.stat().st_size for p in (packed / f"cuda{k}").rglob("*") if p.is_file())
        out = args.root / f"out{k}"
        out.mkdir(parents=True)
        command = [args.python, "scripts/device/cuda_device.py"] + ([verb] + QUICK[verb] if verb else [])
        print(f"\n=== call {k}: carry {carried / 2**20:.2f} MiB + tree {tree / 2**20:.2f} MiB = "
              f"{(carried + tree) / 2**20:.2f} MiB (limit 64); {' '.join(command[1:])}", flush=True)
        if carried + tree > LIMIT:
            raise SystemExit("over the limit")
        started = time.monotonic()
        done = subprocess.run(command, cwd=copy, env={**os.environ, "TS_DEVICE_ROOT": str(args.root / "device"),
                                                      "OUT": str(out), "PYTHONPATH": "", "TS_ALLOW_CPU": "1"})
        print(f"=== call {k}: rc {done.returncode} in {time.monotonic() - started:.1f} s; $OUT: "
              f"{sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())}", flush=True)
        if done.returncode != 0:
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
