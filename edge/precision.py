"""Precisions of the age model made from the file that ships, in memory.

The trained ResNet50 ships as `edge/models/age_int8.onnx` alone (int8 weights with one scale per output
channel, dequantized inside the graph, float maths: a quarter of the fp32 file, within the repository's
budget). On a CPU, ONNX Runtime folds those weights into float at load (`edge.runtime.fold_int8_weights`).
On a GPU, fp16 runs faster (measured on the H100, issue 10, batch 64: 11,763 faces/s against 8,780 for the
folded file with `session.run`, 18,224 against 12,678 with IO binding; ages within 0.08 years of the CPU's),
so the daemon makes fp16 from the int8 file at start:
the weights dequantized as ORT would, then export's own fp16 conversion. Also used by
scripts/device/bench_models.py, which writes the same models to files for the benchmark.

On a GPU the served model also takes its crops as uint8 (`with_uint8_input`: a Cast to float first in the
graph). Crops are uint8 pixels anyway and the model normalises inside the graph (edge.contract), so the ages
are the same to the bit, and a quarter of the bytes cross to the GPU on every call: on the H100 `session.run`,
the daemon's call, ran fp16 at 11,763 faces/s at batch 64 against 18,224 with the crops already on the GPU
(IO binding), a gap that is the float32 upload (issue 10).

And every node of it runs on the GPU: tf2onnx's lowering of the channel flip computes its lengths with shape
nodes, which ONNX Runtime keeps on the CPU, and CUDA graphs refuse such a model (measured on the H100);
`with_whole_reversals_as_gather` makes it a Gather of constant indices, at load here and at export.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.runtime import KEY_QUANTIZATION, WEIGHTS_ONLY


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


def with_uint8_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its one float input taking uint8 values instead, cast to float as the graph's first node
    (same name, same shape). Only for inputs whose values are whole numbers 0..255, as an age model's crops are
    (edge.contract): then every answer is unchanged."""
    model = copy.deepcopy(model)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) == 1 and inputs[0].type.tensor_type.elem_type == TensorProto.UINT8:
        return model  # already takes uint8
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ValueError("not a model with one float input")
    tensor = inputs[0]
    if any(output.name == tensor.name for output in model.graph.output):
        raise ValueError("the model's input is also an output")
    as_float = f"{tensor.name}__as_float"
    for node in model.graph.node:
        node.input[:] = [as_float if name == tensor.name else name for name in node.input]
    cast = helper.make_node("Cast", [tensor.name], [as_float], name="tillsight_uint8_crops",
                            to=tensor.type.tensor_type.elem_type)
    model.graph.node.insert(0, cast)
    tensor.type.tensor_type.elem_type = TensorProto.UINT8
    _in_topological_order(model.graph)
    onnx.checker.check_model(model)
    return model


def with_whole_reversals_as_gather(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every ReverseSequence that reverses whole sequences made a Gather of constant indices
    (T-1 .. 0 along its time axis), and the shape arithmetic that computed its lengths removed.

    tf2onnx lowers Keras' channel flip (`ops.flip`, RGB to BGR in the caffe preprocessing, training/model.py)
    to ReverseSequence with lengths read at run time: Shape, Gather, Expand. ONNX Runtime runs shape
    nodes on the CPU, and CUDA graphs refuse a model that is not all on CUDA ("not all nodes partitioned
    to CUDA"; measured on the H100, issue 10). A lengths tensor is proved whole, not assumed: a constant of
    T everywhere, or an Expand of `Shape(Y)[k]` where dimension k of Y is fixed at T, the reversed axis's
    fixed size. Gather copies the same elements in the same order, so every answer is unchanged to the bit.
    A model without such a node comes back as it is."""
    model = copy.deepcopy(model)
    graph = model.graph
    shapes = _static_shapes(model)
    makers = {output: node for node in graph.node for output in node.output}
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    changed = False
    for index, node in enumerate(graph.node):
        if node.op_type != "ReverseSequence":
            continue
        time_axis = next((a.i for a in node.attribute if a.name == "time_axis"), 0)
        shape = shapes.get(node.input[0])
        if shape is None or not isinstance(shape[time_axis], int):
            continue
        length = shape[time_axis]
        if _uniform_value(node.input[1], makers, constants, shapes) != length:
            continue
        indices = f"{node.output[0]}__reversed_indices"
        graph.initializer.append(numpy_helper.from_array(np.arange(length - 1, -1, -1, dtype=np.int64), indices))
        graph.node[index].CopyFrom(helper.make_node("Gather", [node.input[0], indices], list(node.output),
                                                    name=f"{node.name}__as_gather", axis=time_axis))
        changed = True
    if changed:
        _without_dead_nodes(graph)
        onnx.checker.check_model(model)
    return model


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Each tensor's inferred shape: ints where fixed, names or None where not."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in info.type.tensor_type.shape.dim]
    return shapes


def _uniform_value(name: str, makers: dict, constants: dict, shapes: dict) -> int | None:
    """The one integer every element of tensor `name` holds, where the graph fixes it; else None."""
    if name in constants:
        values = np.unique(constants[name])
        return int(values[0]) if values.size == 1 else None
    node = makers.get(name)
    if node is None:
        return None
    if node.op_type == "Expand":  # a broadcast copies its one value everywhere
        return _uniform_value(node.input[0], makers, constants, shapes)
    if node.op_type == "Gather" and node.input[1] in constants:  # Shape(Y)[k]
        source = makers.get(node.input[0])
        k = constants[node.input[1]]
        if source is None or source.op_type != "Shape" or source.attribute or k.size != 1:
            return None
        dims = shapes.get(source.input[0])
        dim = None if dims is None or not -len(dims) <= int(k.ravel()[0]) < len(dims) else dims[int(k.ravel()[0])]
        return dim if isinstance(dim, int) and dim > 0 else None
    return None


def _without_dead_nodes(graph: onnx.GraphProto) -> None:
    """Removes the nodes (and initializers) nothing reads any more: the graph's outputs are what is read."""
    while True:
        read = {output.name for output in graph.output} | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(output in read for output in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in read]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _in_topological_order(graph: onnx.GraphProto) -> None:
    """Each node after the nodes whose outputs it reads, as onnx's checker asks. export's fp16 files
    (keep_io_types) list their input casts last: ONNX Runtime does not mind, the checker does. (ORT's
    transformers package has a sort, but importing it appends its folder to sys.path.)"""
    known = {tensor.name for tensor in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("the graph reads a tensor that no node makes")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def made_for_gpu(path: Path | str, fp16: bool) -> bytes:
    """What a GPU serves of the age model file at `path`: with a uint8 input, its whole reversals as Gathers
    (every node on the GPU), and in fp16 made from its int8 weights if `fp16` (NotWeightsOnlyInt8 if it has
    none)."""
    model = onnx.load(str(path))
    if fp16 or _weights_only_int8(model):  # the float weights ORT would fold them into at load (the session
        model = dequantize_weights(model)[0]  # of a model made in memory does not fold them: edge.runtime)
    model = with_uint8_input(with_whole_reversals_as_gather(model))
    return (to_fp16(model) if fp16 else model).SerializeToString()


def _weights_only_int8(model: onnx.ModelProto) -> bool:
    """edge.runtime.is_weights_only_int8, of a model in memory."""
    return any(p.key == KEY_QUANTIZATION and p.value == WEIGHTS_ONLY for p in model.metadata_props)
