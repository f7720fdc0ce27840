"""The shipped detector is what `tillsight export detector` produces today."""

import importlib.util

import cv2
import numpy as np
import onnxruntime as ort

from edge.detect import VARIANTS, letterbox
from tskit import absent, tillsight


def test_fresh_conversion_matches_the_shipped_detector(tmp_path, two_people_photo):
    if importlib.util.find_spec("tf2onnx") is None:
        absent("tf2onnx (the train extra) is not installed")
    out = tmp_path / "fresh.onnx"
    result = tillsight("export", "detector", "--out", str(out))
    assert result.returncode == 0, result.stderr
    variant = VARIANTS["full_range"]
    tensor, _ = letterbox(cv2.imread(str(two_people_photo)), variant.input_size)
    outputs = []
    for path in (variant.onnx_path, out):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: tensor[None]}))
    for shipped, fresh in zip(*outputs):
        assert shipped.shape == fresh.shape
        assert np.abs(shipped - fresh).max() < 1e-4
    assert outputs[0][1].max() > 0  # the photo's faces give confident logits: a real comparison


def test_unknown_variant_is_one_line(tmp_path):
    result = tillsight("export", "detector", "--variant", "tiny", "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    assert result.stderr.strip() == "tillsight: error: unknown detector variant 'tiny' (choose from short_range, full_range, back)"
