#!/usr/bin/env python3
"""The age models the CUDA benchmark times on the GPU machine, made there from the shipped one.

The trained ResNet50 ships as `edge/models/age_int8.onnx` alone (int8 weights with float maths: the
fp32 file, 95 MB, and fp16, 48 MB, do not fit the repository), and the tree travels with every device
call, so the machine has that file and nothing more. Its weights are int8 values with one scale per
output channel, dequantized inside the graph; dequantized once here they give the fp32 model that
ONNX Runtime builds from it at load (edge/runtime.py `fold_int8_weights`), and fp16 follows from that
by export's own conversion.

    shipped INT8.onnx --out DIR     DIR/age.onnx (the DequantizeLinear of every weight folded into a
                                    float initializer; the weights-only mark removed from the metadata; the
                                    channel flip a Gather, as the daemon serves it on a GPU),
                                    DIR/age_fp16.onnx (edge/precision.py `to_fp16`: onnxruntime.transformers
                                    .float16, keep_io_types=True) and DIR/age_int8.onnx (the file itself)
    smoke DIR [--faces PHOTO|VIDEO] finite ages from every variant in DIR on real face crops (CPU)

onnx + numpy + onnxruntime and the daemon's own conversion (edge/precision.py, which makes fp16 from the int8
file at start on a GPU); runs on Python 3.11 and 3.12, without the `export` package (it needs the train
extra, which the machine lacks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

VARIANT_FILES = ("age.onnx", "age_fp16.onnx", "age_int8.onnx")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# the daemon's own conversion (it makes fp16 from the int8 file at start on a GPU): the benchmark times what it serves
from edge.precision import (NotWeightsOnlyInt8, dequantize_weights, to_fp16,  # noqa: E402
                            with_whole_reversals_as_gather)
from edge.contract import AgeModelInfo, ContractError, read_contract  # noqa: E402  the crop the model was trained on


def from_shipped(int8_path: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fp32, count = dequantize_weights(onnx.load(str(int8_path)))
    fp32 = with_whole_reversals_as_gather(fp32)  # as the daemon serves it: every node on CUDA, CUDA graphs possible
    onnx.save(fp32, str(out / "age.onnx"))
    onnx.save(to_fp16(fp32), str(out / "age_fp16.onnx"))
    shutil.copy2(int8_path, out / "age_int8.onnx")
    written = [out / name for name in VARIANT_FILES]
    print(f"{count} weights dequantized from {int8_path.name}: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in written), flush=True)
    return written


def _crops(count: int, model: AgeModelInfo, source: Path | None) -> tuple[np.ndarray, str]:
    """Real face crops (the repo's detector on a photo, or on a video's frames), cut as the model's metadata
    says (its size, margin and eye line: the crop it was trained on, as the daemon cuts it), else random pixels."""
    size = model.input_size
    random = np.random.default_rng(0).integers(0, 256, (count, size, size, 3)).astype(np.float32)
    if source is None or not source.is_file():
        return random, f"random pixels ({source} not found)"
    try:
        import cv2
        from edge.detect import FaceDetector, detect_in_photo
        detector, crops = FaceDetector(), []
        if source.suffix.lower() in (".jpg", ".jpeg", ".png"):
            image = cv2.imread(str(source))
            crops = [model.crop(image, f) for f in detect_in_photo(detector, image)]
        else:
            capture = cv2.VideoCapture(str(source))
            while len(crops) < count:
                ok, image = capture.read()
                if not ok:
                    break
                crops += [model.crop(image, f) for f in detector(image)]
        if not crops:
            return random, f"random pixels (no face found in {source.name})"
        found = len(crops)
        crops = (crops * (count // found + 1))[:count]
        return np.stack(crops).astype(np.float32), f"{min(found, count)} real face crops from {source.name}"
    except Exception as exc:  # noqa: BLE001 - any failure: random crops, and it says so
        return random, f"random pixels ({type(exc).__name__}: {exc})"


def smoke(folder: Path, faces: Path | None, batch: int = 4) -> dict:
    """Each variant in `folder` on this machine's onnxruntime (CPU): finite ages for real face crops."""
    import onnxruntime as ort
    report = {}
    for name in VARIANT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        try:
            model = read_contract(session)
        except ContractError as exc:
            raise SystemExit(f"{path}: {exc}") from None
        x, source = _crops(batch, model, faces)
        ages = np.ravel(session.run(None, {session.get_inputs()[0].name: x})[0])
        report[name] = {"finite": bool(np.isfinite(ages).all()), "ages": [round(float(a), 2) for a in ages],
                        "crops": source, "providers": session.get_providers()}
        print(name, json.dumps(report[name]), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("shipped")
    s.add_argument("model", type=Path)
    s.add_argument("--out", type=Path, required=True)
    k = commands.add_parser("smoke")
    k.add_argument("folder", type=Path)
    k.add_argument("--faces", type=Path)
    args = parser.parse_args(argv)
    if args.command == "shipped":
        try:
            from_shipped(args.model, args.out)
        except NotWeightsOnlyInt8 as exc:
            raise SystemExit(str(exc)) from None
        return 0
    report = smoke(args.folder, args.faces)
    if not report or not all(r["finite"] for r in report.values()):
        print("smoke test failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
