"""The age model contract: what any ONNX age model must look like to be served.

    input    float32 [N, S, S, 3]: RGB crops from `edge.crop.crop_face`, pixel
             values 0..255; the model does its own normalisation, so the
             preprocessing lives inside the graph. N may be dynamic or fixed.
             uint8 is taken too, the same pixel values: what a GPU serves is
             made so at load (edge.precision.with_uint8_input), a quarter of
             the bytes to upload.
    output 0 float32 [N] or [N, 1]: estimated age in years.
    output "age_spread" (optional) float32 [N] or [N, 1]: the model's own
             standard deviation in years (e.g. from a distribution head).
    metadata (ONNX metadata_props, all strings):
        tillsight.contract     "1"
        tillsight.input_size   S, e.g. "224"
        tillsight.crop_margin  margin passed to crop_face, e.g. "0.4"
        tillsight.crop_eye_y   (optional) eye height passed to crop_face, e.g.
                               "0.3"; absent: the crop is centred on the box
        anything else (training data, validation MAE, ...) is informational.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.crop import crop_face
from edge.types import Face

CONTRACT_VERSION = "1"
KEY_CONTRACT = "tillsight.contract"
KEY_INPUT_SIZE = "tillsight.input_size"
KEY_CROP_MARGIN = "tillsight.crop_margin"
KEY_CROP_EYE_Y = "tillsight.crop_eye_y"
SPREAD_OUTPUT = "age_spread"


class ContractError(ValueError):
    pass


@dataclass(frozen=True)
class AgeModelInfo:
    input_size: int
    crop_margin: float
    fixed_batch: int | None  # None when the batch dimension is dynamic
    has_spread: bool
    metadata: dict[str, str] = field(default_factory=dict)
    crop_eye_y: float | None = None

    def crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        """The crop this model was trained on, of one face in a BGR frame."""
        return crop_face(image_bgr, face, self.input_size, self.crop_margin, self.crop_eye_y)


def contract_metadata(input_size: int, crop_margin: float, crop_eye_y: float | None = None,
                      **extra: object) -> dict[str, str]:
    """The metadata an exporter writes into an age model."""
    meta = {KEY_CONTRACT: CONTRACT_VERSION, KEY_INPUT_SIZE: str(input_size), KEY_CROP_MARGIN: str(crop_margin)}
    if crop_eye_y is not None:
        meta[KEY_CROP_EYE_Y] = str(crop_eye_y)
    meta.update({f"tillsight.{k}": str(v) for k, v in extra.items()})
    return meta


def read_contract(session) -> AgeModelInfo:
    """Check an onnxruntime session against the contract; raise ContractError with one line."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get(KEY_CONTRACT) != CONTRACT_VERSION:
        raise ContractError(f"metadata {KEY_CONTRACT}={meta.get(KEY_CONTRACT)!r}, expected {CONTRACT_VERSION!r}")
    try:
        size = int(meta[KEY_INPUT_SIZE])
        margin = float(meta[KEY_CROP_MARGIN])
        eye_y = float(meta[KEY_CROP_EYE_Y]) if KEY_CROP_EYE_Y in meta else None
    except (KeyError, ValueError) as exc:
        raise ContractError(f"metadata {KEY_INPUT_SIZE}, {KEY_CROP_MARGIN} (and {KEY_CROP_EYE_Y} if present) "
                            f"must be numbers ({exc})") from None
    if not 16 <= size <= 1024 or not 0 <= margin <= 2 or not (eye_y is None or 0 < eye_y < 1):
        raise ContractError(f"input size {size}, crop margin {margin} or crop eye y {eye_y} out of range")
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type not in ("tensor(float)", "tensor(uint8)") or len(inputs[0].shape) != 4:
        raise ContractError("expected one float32 (or uint8) input of shape [N, S, S, 3]")
    batch, height, width, channels = inputs[0].shape
    if channels != 3 or any(isinstance(d, int) and d != size for d in (height, width)):
        raise ContractError(f"input shape {inputs[0].shape} does not match [N, {size}, {size}, 3]")
    if isinstance(batch, int) and batch <= 0:
        raise ContractError(f"input batch dimension {batch}: must be dynamic or a positive number")
    outputs = session.get_outputs()
    if not outputs or len(outputs[0].shape or []) not in (1, 2) or \
            (len(outputs[0].shape) == 2 and isinstance(outputs[0].shape[1], int) and outputs[0].shape[1] != 1):
        raise ContractError(f"first output must be the age, shape [N] or [N, 1], not {outputs[0].shape if outputs else None}")
    fixed_batch = batch if isinstance(batch, int) else None
    has_spread = any(o.name == SPREAD_OUTPUT for o in outputs)
    return AgeModelInfo(size, margin, fixed_batch, has_spread, meta, eye_y)


def build_constant_age_model(age: float, input_size: int = 64, crop_margin: float = 0.4,
                             fixed_batch: int | None = None) -> bytes:
    """A contract-following ONNX model that answers `age` for every crop.

    For tests of the policy path (deterministic ages through real ONNX
    Runtime). The answer still depends on the input (mean pixel * 0 + age),
    so ONNX Runtime cannot fold the graph away and the crops really travel
    through the session.
    """
    import onnx
    from onnx import TensorProto, helper

    batch = fixed_batch or "N"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["crops"], ["mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "age_value"], ["age"]),
        ],
        "constant_age",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, [batch, input_size, input_size, 3])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, [batch])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("age_value", TensorProto.FLOAT, [], [float(age)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tillsight")
    model.ir_version = 8
    for key, value in contract_metadata(input_size, crop_margin, kind=f"constant {age} (test/demo placeholder)").items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()
