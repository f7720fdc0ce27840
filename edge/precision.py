"""Precisions of the age model made from the file that ships, in memory.

The trained ResNet50 ships as `edge/models/age_int8.onnx` alone (int8 weights with one scale per output
channel, dequantized inside the graph, float maths: a quarter of the fp32 file, within the repository's
budget). On a CPU, ONNX Runtime folds those weights into float at load (`edge.runtime.fold_int8_weights`).
On a GPU, fp16 runs faster (measured on the H100, issue 10, batch 64: 11,763 faces/s against 8,780 for the
folded file with `session.run`, 18,224 against 12,678 with IO binding; ages within 0.08 years of the CPU's),
so the daemon makes fp16 from the int8 file at start:
the weights dequantized as ORT would, then export's own fp16 conversion. Also used by
scripts/device/bench_models.py, which writes the same models to files for the benchmark.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge.runtime import KEY_QUANTIZATION


class NotWeightsOnlyInt8(ValueError):
    """The model has no int8 weights to dequantize."""


def dequantize_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every DequantizeLinear whose inputs are all initializers becomes the float initializer it computes:
    (q - zero_point) * scale along its axis. Returns the float model and how many weights were folded."""
    model = copy.deepcopy(model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    folded, kept = {}, []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not all(name in initializers for name in node.input):
            kept.append(node)
            continue
        values = [numpy_helper.to_array(initializers[name]) for name in node.input]
        q, scale = values[0].astype(np.float32), values[1].astype(np.float32)
        zero = values[2].astype(np.float32) if len(values) > 2 else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per channel: broadcast along `axis`
            shape = [-1 if i == axis % q.ndim else 1 for i in range(q.ndim)]
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        folded[node.output[0]] = ((q - zero) * scale).astype(np.float32)
    if not folded:
        raise NotWeightsOnlyInt8("no weights to dequantize: not an int8 weights-only model")
    used = {name for node in kept for name in node.input}
    del model.graph.node[:]
    model.graph.node.extend(kept)
    remaining = [t for t in model.graph.initializer if t.name in used and t.name not in folded]
    del model.graph.initializer[:]
    model.graph.initializer.extend(remaining + [numpy_helper.from_array(v, k) for k, v in folded.items()])
    meta = [p for p in model.metadata_props if p.key != KEY_QUANTIZATION]
    del model.metadata_props[:]
    model.metadata_props.extend(meta)
    onnx.checker.check_model(model)
    return model, len(folded)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float weights and maths in fp16, inputs and outputs kept float32 (what export writes as age_fp16.onnx)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)


def fp16_from_int8_weights(path: Path | str) -> bytes:
    """The serialized fp16 model made from an int8 weights-only file (NotWeightsOnlyInt8 if it is not one)."""
    fp32, _ = dequantize_weights(onnx.load(str(path)))
    return to_fp16(fp32).SerializeToString()
