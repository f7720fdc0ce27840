"""The models tillsight knows by name: the age model's tiers, and the BlazeFace detectors (files and anchor layouts).
Kept apart from tiers.py and detect.py, which load and run them with NumPy, OpenCV and ONNX Runtime, so that the
config schema names them without importing those (a third of a second of every `tillsight status` and `pos`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TIERS = ("auto", "resnet50", "light")  # the age models a config may name instead of a file: see tiers.py

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class BlazeFaceVariant:
    """Anchor layout of one BlazeFace model (MediaPipe's ssd_anchors options)."""

    name: str
    tflite_name: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]  # per distinct stride, in order

    @property
    def onnx_path(self) -> Path:
        return MODELS_DIR / f"blazeface_{self.name}.onnx"


# From mediapipe/modules/face_detection/*.pbtxt. The full-range model has one
# dense stride-4 layer (48x48 anchors), made for faces further from the camera.
VARIANTS = {
    "short_range": BlazeFaceVariant("short_range", "face_detection_short_range.tflite", 128, (8, 16), (2, 6)),
    "full_range": BlazeFaceVariant("full_range", "face_detection_full_range.tflite", 192, (4,), (1,)),
    "back": BlazeFaceVariant("back", "face_detection_back.tflite", 256, (16, 32), (2, 6)),
}
DEFAULT_VARIANT = "full_range"
