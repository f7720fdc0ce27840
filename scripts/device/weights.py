"""Carry a trained run's best weights off the GPU machine in parts small enough for its $OUT.

    python scripts/device/weights.py pack RUN_DIR OUT_DIR      # on the GPU machine (any Keras backend)
    python scripts/device/weights.py unpack PARTS_DIR RUN_DIR  # here: rebuilds RUN_DIR/checkpoints/best.keras

pack: checkpoints/best.keras -> weights.npz (trainable float weights as float16, the rest as
they are: batch-norm statistics stay float32, small variances must not flush to zero), cut into
parts of at most PART_BYTES, plus the run's small files in run-files.tar.gz (run.json,
state.json, summary.json, history.csv, curves.png). $OUT takes 8 files of 16 MiB: a ResNet50
is ~51 MB this way, four parts.
unpack: joins the parts, checks their sha256, rebuilds the model from run.json's options with
the same `training.model.build_model`, loads the weights by name and saves best.keras, so
`tillsight export` and `eval` take the run folder as if it had been trained here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PART_BYTES = 15 * 1024 * 1024
RUN_FILES = ("run.json", "state.json", "summary.json", "history.csv", "curves.png")


def pack(run_dir: Path, out: Path) -> None:
    import keras

    import training.model  # noqa: F401  registers the custom layers
    model = keras.models.load_model(run_dir / "checkpoints" / "best.keras", compile=False)
    arrays, manifest = {}, []
    for index, variable in enumerate(model.weights):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        if variable.trainable and np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float16)
        arrays[f"w{index:04d}"] = value
        manifest.append({"path": variable.path, "shape": list(value.shape), "stored": str(value.dtype)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = [blob[i : i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)]
    for number, part in enumerate(parts):
        (out / f"weights.npz.part{number}").write_bytes(part)
    with tarfile.open(out / "run-files.tar.gz", "w:gz") as archive:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                archive.add(run_dir / name, arcname=name)
        info = json.dumps({"parts": len(parts), "sha256": hashlib.sha256(blob).hexdigest(), "weights": manifest}).encode()
        member = tarfile.TarInfo("weights.json")
        member.size = len(info)
        archive.addfile(member, io.BytesIO(info))
    print(f"packed {len(manifest)} weights, {len(blob) / 1e6:.1f} MB in {len(parts)} parts into {out}")


def unpack(parts_dir: Path, run_dir: Path) -> None:
    import os
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from training import quiet_import
    quiet_import("keras")  # TensorFlow's start-up chatter, silenced
    from training.model import build_model
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(parts_dir / "run-files.tar.gz") as archive:
        archive.extractall(run_dir, filter="data")
    info = json.loads((run_dir / "weights.json").read_text())
    blob = b"".join((parts_dir / f"weights.npz.part{n}").read_bytes() for n in range(info["parts"]))
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise SystemExit("the weight parts do not match their sha256: a part is missing or damaged")
    stored = np.load(io.BytesIO(blob))
    options = json.loads((run_dir / "run.json").read_text())["options"]
    model = build_model(options["input_size"], options["head"])
    if [v.path for v in model.weights] != [w["path"] for w in info["weights"]]:
        raise SystemExit("the weights were packed from a different model layout than build_model makes here")
    for index, variable in enumerate(model.weights):
        variable.assign(stored[f"w{index:04d}"].astype(variable.dtype))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    model.save(run_dir / "checkpoints" / "best.keras")
    print(f"rebuilt {run_dir / 'checkpoints' / 'best.keras'} from {info['parts']} parts ({len(info['weights'])} weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, first, second in (("pack", "run_dir", "out"), ("unpack", "parts_dir", "run_dir")):
        command = sub.add_parser(name)
        command.add_argument(first, type=Path)
        command.add_argument(second, type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.run_dir, args.out)
    else:
        unpack(args.parts_dir, args.run_dir)


if __name__ == "__main__":
    main()
