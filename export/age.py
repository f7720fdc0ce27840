"""`tillsight export CHECKPOINT --out DIR [--fp16] [--int8 --calibration DIR]`.

Keras checkpoint (TensorFlow backend) -> ONNX with tf2onnx, following the
contract in edge/contract.py: input `crops` float32 [N, S, S, 3] RGB 0..255
(dynamic batch, preprocessing inside the graph), outputs `age` and, for the
distribution head, `age_spread`; opset 17. Then a parity check on real face
crops, and the faster variants:
    age.onnx        fp32, checked: |Keras - ONNX Runtime| < 0.05 years
    age_fp16.onnx   fp16 weights and maths, fp32 inputs/outputs (for GPUs)
    age_int8.onnx   static int8 (QDQ), calibrated on real crops of the run's training split, the
                    head after the last convolution in float (for CPUs)
    export.json     parity and MAE figures
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge import __version__
from edge.contract import contract_metadata

OPSET = 17
PARITY_TOLERANCE_YEARS = 0.05
# fp16 against fp32, face by face: the shipped ResNet50's fp16 is within 0.11 years of fp32 (H100, CPU alike)
FP16_TOLERANCE_YEARS = 1.0


class ExportError(Exception):
    pass


class MarginError(ExportError):
    """A --crop-margin that is not the run's: a usage error."""


def _keras_tensorflow():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from training import quiet_import
    try:
        keras = quiet_import("keras")
        tf = quiet_import("tensorflow")
        tf2onnx = quiet_import("tf2onnx")
    except ImportError as exc:
        raise ExportError(f"export needs the train extra ({exc.name} missing): pip install 'tillsight[train]'") from None
    if keras.backend.backend() != "tensorflow":
        raise ExportError(f"export needs KERAS_BACKEND=tensorflow (tf2onnx), not {keras.backend.backend()}")
    return keras, tf, tf2onnx


def load_checkpoint(path: Path):
    keras, _, _ = _keras_tensorflow()
    import training.model  # noqa: F401  registers tillsight's custom layers and losses
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras says "File not found" of a file it found
        raise ExportError(f"checkpoint {path} is damaged or no Keras checkpoint: a .keras file is a zip archive, "
                          f"this is not one")
    from training import silenced_stderr
    try:
        with silenced_stderr():  # TensorFlow's first op probes CUDA and prints cuInit failures on CPU machines
            model = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ExportError(f"checkpoint {path} cannot be loaded: {str(exc).strip().splitlines()[0][:200]}") from None
    model = _as_float32(model, keras)
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):  # a Sequential saved before it was built has no input
        inputs, outputs = [], []
    shape = tuple(inputs[0].shape[1:]) if len(inputs) == 1 else None
    if shape is None or len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        found = f"input shape {shape}" if shape is not None else f"{len(inputs) or 'no defined'} inputs"
        raise ExportError(f"checkpoint {path} is not an age model: {found}, expected one of shape (S, S, 3)")
    from training.model import MAX_AGE
    ages = tuple(outputs[0].shape[1:]) if len(outputs) == 1 else None
    if ages not in ((), (1,), (MAX_AGE + 1,)):  # the contract's age [N] or [N, 1], or the distribution head's
        found = f"output shape {ages}" if ages is not None else f"{len(outputs)} outputs"
        raise ExportError(f"checkpoint {path} is not an age model: {found}, expected one age a face (N, 1) or "
                          f"the distribution head's (N, {MAX_AGE + 1})")
    # a Sequential model loaded from a file has no `input` to build the serving model on: the same layers, as a
    # functional model
    return keras.Model(inputs[0], outputs[0], name=model.name) if isinstance(model, keras.Sequential) else model


def _as_float32(model, keras):
    """A model trained with mixed precision computes in float16; the exported fp32
    model and the Keras reference of the parity check must both compute in
    float32. The variables are float32 already: rebuild the graph with a
    float32 policy and copy them over."""
    config = json.dumps(keras.saving.serialize_keras_object(model))
    if "mixed_float16" not in config and "mixed_bfloat16" not in config:
        return model
    config = config.replace('"mixed_float16"', '"float32"').replace('"mixed_bfloat16"', '"float32"')
    rebuilt = keras.saving.deserialize_keras_object(json.loads(config))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def run_info(checkpoint: Path) -> dict:
    """The training run's options and outcome, from the run folder around the checkpoint."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    info = {"run_dir": run_dir}
    for name in ("run.json", "summary.json", "state.json"):
        path = run_dir / name
        if path.is_file():
            try:
                info[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8 (a file cut short, edited)
                raise ExportError(f"{path}: cannot be read as the training run's JSON "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
            if not isinstance(info[name], dict) or name == "run.json" and not isinstance(info[name].get("options"), dict):
                raise ExportError(f"{path}: not the {name} that `tillsight train` writes")
    return info


def trained_margin(checkpoint: Path, info: dict, crop_margin: float | None) -> float:
    """The crop margin the model was trained at: run.json's. `crop_margin` (--crop-margin) only where there is
    no run.json; one that differs from it overrode it, and the daemon then cut faces as the model never saw them."""
    saved = info.get("run.json", {}).get("options", {}).get("crop_margin")
    if saved is None and crop_margin is None:
        raise ExportError(f"crop margin unknown: no run.json beside {checkpoint}; pass --crop-margin")
    if saved is not None and crop_margin is not None and float(crop_margin) != float(saved):
        raise MarginError(f"--crop-margin {crop_margin:g} differs from {info['run_dir'] / 'run.json'}'s {saved:g}, "
                          "the margin the model was trained at: leave --crop-margin out")
    return float(saved if saved is not None else crop_margin)


def to_onnx(model, input_size: int):
    keras, tf, tf2onnx = _keras_tensorflow()
    from training.model import serving_model
    serving = serving_model(model)
    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name="crops"),)
    onnx_model, _ = tf2onnx.convert.from_keras(serving, input_signature=spec, opset=OPSET)
    from edge.precision import with_whole_reversals_as_gather  # the channel flip without shape nodes: all on CUDA
    onnx_model = with_whole_reversals_as_gather(onnx_model)
    names = [o.name for o in onnx_model.graph.output]
    if names[0] != "age":  # the contract: the age is output 0
        order = sorted(onnx_model.graph.output, key=lambda o: o.name != "age")
        del onnx_model.graph.output[:]
        onnx_model.graph.output.extend(order)
    return serving, onnx_model


def parity_crops(info: dict, calibration: Path | None, size: int, margin: float, limit: int = 64):
    """Real face crops (and ages if known) for the parity and MAE checks."""
    faces_file = info["run_dir"] / "faces.npz"
    if faces_file.is_file():
        stored = np.load(faces_file, allow_pickle=False)
        if int(stored["input_size"]) == size:
            from training.data import split_of
            fraction = info.get("run.json", {}).get("options", {}).get("val_fraction", 0.1)
            val = np.array([split_of(str(n), fraction) == "val" for n in stored["names"]])
            index = np.flatnonzero(val)[:limit] if val.any() else np.arange(min(limit, len(val)))
            return stored["crops"][index], stored["ages"][index]
    if calibration is not None:
        return calibration_crops(calibration, size, margin, limit), None
    raise ExportError("no real face crops for the parity check: keep the run's faces.npz beside the checkpoint "
                      "or pass --calibration DIR")


def calibration_crops(folder: Path, size: int, margin: float, limit: int = 200,
                      val_fraction: float | None = None, test_fraction: float = 0.0) -> np.ndarray:
    """Up to `limit` face crops from a folder of photos; with `val_fraction` (and `test_fraction`: the run's),
    only photos of its training split, so that the figures measured on the others owe nothing to them."""
    from training.data import IMAGE_SUFFIXES, Label, load_faces, split_of
    if not folder.is_dir():
        raise ExportError(f"calibration folder not found: {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    names += sorted(p.name for p in (folder / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if (folder / "images").is_dir() else []
    shards = sorted(folder.glob("images-*.tar*"))
    if shards:
        from training.data import read_labels
        labels = read_labels(folder / "labels.csv")
    else:
        labels = [Label(name, 0.0) for name in names]
    if val_fraction is not None:
        labels = [label for label in labels if split_of(label.file_name, val_fraction, test_fraction) == "train"]
    from training.data import select
    labels = select(labels, limit) if shards else labels[:limit]
    if not labels:
        raise ExportError(f"calibration folder {folder} has no images")
    faces = load_faces(folder, labels, size, margin, progress=False)
    if len(faces.labels) < 8:
        raise ExportError(f"calibration folder {folder}: faces found in only {len(faces.labels)} images, need 8 or more")
    return faces.crops


def _ort_ages(path_or_bytes, crops: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return session.run(["age"], {"crops": crops.astype(np.float32)})[0].reshape(-1)


def export_age_model(checkpoint: Path, out_dir: Path, fp16: bool = False, int8: bool = False,
                     calibration: Path | None = None, crop_margin: float | None = None) -> dict:
    import onnx
    if int8 and calibration is None:
        raise ExportError("--int8 needs --calibration DIR (a folder of face photos)")
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    info = run_info(checkpoint)
    options = info.get("run.json", {}).get("options", {})
    margin = trained_margin(checkpoint, info, crop_margin)  # before the checkpoint loads (seconds)
    model = load_checkpoint(checkpoint)
    size = int(model.input.shape[1])
    started = time.perf_counter()
    serving, onnx_model = to_onnx(model, size)
    val_mae = info.get("state.json", {}).get("best_val_mae")
    metadata = contract_metadata(size, margin, head=options.get("head", "unknown"),
                                 training_data=options.get("data", "unknown"),
                                 validation_mae="" if val_mae is None else f"{val_mae:.3f}",
                                 exported=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 version=__version__, opset=OPSET, checkpoint=checkpoint.name)
    for key, value in metadata.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(onnx_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_earlier_export(out_dir, {name for name, asked in zip(VARIANTS, (fp16, int8)) if asked})
    fp32_path = out_dir / "age.onnx"
    fp32_path.write_bytes(onnx_model.SerializeToString())

    crops, ages = parity_crops(info, calibration, size, margin)
    keras_ages = np.asarray(serving.predict(crops.astype(np.float32), verbose=0)["age"], np.float64).reshape(-1)
    onnx_ages = _ort_ages(str(fp32_path), crops)
    difference = np.abs(keras_ages - onnx_ages)
    report = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
              "calibration": None if calibration is None else str(calibration),
              "input_size": size, "crop_margin": margin, "opset": OPSET,
              "parity_crops": len(crops),
              "fp32": {"path": str(fp32_path), "max_abs_diff": float(difference.max()),
                       "mean_abs_diff": float(difference.mean()), "size_bytes": fp32_path.stat().st_size}}
    check_parity(float(difference.max()), fp32_path)
    if ages is not None:
        report["fp32"]["mae"] = float(np.mean(np.abs(onnx_ages - ages)))
    if fp16:
        report["fp16"] = check_fp16(_variant(out_dir / "age_fp16.onnx", _to_fp16(onnx_model), crops, ages, onnx_ages))
    if int8:
        calib = calibration_crops(calibration, size, margin, val_fraction=options.get("val_fraction"),
                                  test_fraction=options.get("test_fraction", 0.0))
        report["int8"] = _variant(out_dir / "age_int8.onnx", quantize_int8(fp32_path, calib, out_dir), crops, ages,
                                  onnx_ages)
        report["int8"]["calibration_crops"] = len(calib)
    report["files"] = {name: file_sha256(out_dir / name) for name in ("age.onnx", *VARIANTS)
                       if (out_dir / name).is_file()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    return report


VARIANTS = ("age_fp16.onnx", "age_int8.onnx")  # beside age.onnx; edge/tiers.py serves them by these names


def clear_earlier_export(out_dir: Path, written: set[str]) -> None:
    """An earlier export's files out of the way: its variants that this export does not write again were left
    beside the new age.onnx, in no export.json, and served, scored and shipped as this model's. Those to be
    written again go too, and export.json: an export that fails half way leaves no file of another model."""
    stale = sorted(p.name for p in out_dir.glob("age_*.onnx") if p.name not in written)
    for path in [out_dir / "export.json", *(out_dir / name for name in (*stale, *written))]:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ExportError(f"{path}: an earlier export's file cannot be removed ({exc.strerror or exc})") from None
    if stale:
        print(f"{out_dir}: removed {', '.join(stale)} of an earlier export (this one does not write "
              f"{'it' if len(stale) == 1 else 'them'})")


def check_parity(max_abs_diff: float, fp32_path) -> None:
    """The ONNX file answers what Keras does, within PARITY_TOLERANCE_YEARS (NaN, an overflow, is no answer)."""
    if not max_abs_diff <= PARITY_TOLERANCE_YEARS:  # NaN compares false with anything
        raise ExportError(f"ONNX output differs from Keras by up to {max_abs_diff:.3f} years "
                          f"(tolerance {PARITY_TOLERANCE_YEARS}); {fp32_path} is not trustworthy")


def check_fp16(row: dict) -> dict:
    """The fp16 file's figures, if it agrees with fp32: else ExportError (a conversion gone wrong, not rounding)."""
    # not `>` alone: NaN (fp16's overflow, the usual way its conversion goes wrong) compares false with anything
    if not row["max_abs_diff_vs_fp32"] <= FP16_TOLERANCE_YEARS:
        raise ExportError(f"fp16 differs from fp32 by up to {row['max_abs_diff_vs_fp32']:.3f} years (tolerance "
                          f"{FP16_TOLERANCE_YEARS}); {row['path']} is not trustworthy")
    return row


def file_sha256(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _variant(path: Path, model_bytes: bytes, crops, ages, fp32_ages) -> dict:
    path.write_bytes(model_bytes)
    variant_ages = _ort_ages(str(path), crops)
    row = {"path": str(path), "size_bytes": path.stat().st_size,
           "max_abs_diff_vs_fp32": float(np.abs(variant_ages - fp32_ages).max()),
           "mean_abs_diff_vs_fp32": float(np.abs(variant_ages - fp32_ages).mean())}
    if ages is not None:
        row["mae"] = float(np.mean(np.abs(variant_ages - ages)))
        row["mae_change_vs_fp32"] = row["mae"] - float(np.mean(np.abs(fp32_ages - ages)))
    return row


def _to_fp16(onnx_model) -> bytes:
    from edge.precision import to_fp16  # the daemon's own: it makes fp16 from the int8 file on a GPU
    return to_fp16(onnx_model).SerializeToString()


def head_nodes(model) -> list[str]:
    """The names of the nodes downstream of the last convolution: pooling, the fully connected layer, the
    softmax and the expectation and spread over the age bins. int8 leaves them in float: per-tensor
    uint8 cuts every age bin's probability under 1/255 of the largest to zero and rounds each bin's
    share of the expectation, which moves a trained model's ages by years, for a negligible share of
    the compute (1 x 2048 features against the convolutions' millions of multiplications)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convolutions = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convolutions:
        return []
    head, frontier = {}, list(convolutions[-1].output)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in head:
                head[node.name] = node
                frontier.extend(node.output)
    return list(head)


def quantize_int8(fp32_path: Path, calibration: np.ndarray, out_dir: Path, head_in_float: bool = True) -> bytes:
    """Static int8 (QDQ, per-channel weights, uint8 activations) calibrated on real crops; with
    `head_in_float`, everything after the last convolution stays in float (`head_nodes`)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"crops": calibration[i : i + 8].astype(np.float32)}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = out_dir / "age_int8.prep.tmp.onnx"
    target = out_dir / "age_int8.tmp.onnx"
    try:
        # ORT's recommended first step: shape inference and graph optimisation, so
        # that quantisation sees fused Conv+BatchNorm layers.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)  # only the batch is dynamic
        model = onnx.load(str(prepared))
        for index, node in enumerate(model.graph.node):  # nodes_to_exclude goes by name: every node needs one
            node.name = node.name or f"tillsight_node_{index}"
        onnx.save(model, str(prepared))
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=head_nodes(model) if head_in_float else [])
        return target.read_bytes()
    finally:
        target.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def quantize_weights_int8(fp32_path: Path, min_size: int = 1024) -> bytes:
    """int8 weights, float maths: every Conv, Gemm and MatMul weight of `min_size` or more values as int8
    with one symmetric scale per output channel, dequantized inside the graph, which ONNX Runtime folds
    back into float weights at load (`edge.runtime.fold_int8_weights`, told by the metadata). A quarter
    of the fp32 file at fp32's speed, and no activation rounding: what ships when full int8 moves
    faces too far (on the light model: max |shift| 2.6 years against 6.6, benchmarks/int8_head.py)."""
    import onnx
    from onnx import helper, numpy_helper

    from edge.runtime import KEY_QUANTIZATION, WEIGHTS_ONLY
    model = onnx.load(str(fp32_path))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    dequantize = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if name not in initializers or any(d.output[0] == name for d in dequantize):
            continue
        weights = numpy_helper.to_array(initializers[name]).astype(np.float32)
        if weights.ndim < 2 or weights.size < min_size:
            continue
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and transposed) else weights.ndim - 1
        reduce = tuple(i for i in range(weights.ndim) if i != axis)
        scale = np.abs(weights).max(axis=reduce) / 127.0
        scale[scale == 0] = 1.0
        shape = [-1 if i == axis else 1 for i in range(weights.ndim)]
        quantized = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
        model.graph.initializer.remove(initializers[name])
        model.graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_int8"),
                                        numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero")])
        dequantize.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                           [name], axis=axis, name=f"{name}_dequantize"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(dequantize + nodes)  # before every use: the graph stays topologically sorted
    kept = [p for p in model.metadata_props if p.key != KEY_QUANTIZATION]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=KEY_QUANTIZATION, value=WEIGHTS_ONLY)
    onnx.checker.check_model(model)
    return model.SerializeToString()
