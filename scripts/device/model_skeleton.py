#!/usr/bin/env python3
"""A weightless copy of an ONNX model, and random weights of the same statistics regenerated from it.

For the GPU machine, where a call carries 64 MiB: the random-init ResNet50 of `tillsight bench` is 94 MB
(fp32), 47 MB (fp16) and 24 MB (int8), but its speed does not depend on the values of its weights.

    strip MODEL.onnx... --out DIR      DIR/<name>.skel.onnx: the same graph, metadata and small tensors
                                       (per-channel vectors, shapes: anything under --min-elements or 1-D)
                                       kept as they are; every large initializer emptied, with its dtype,
                                       shape, mean, std, min and max in its doc_string
    regen DIR|TAR.XZ --out DIR [--fp16 convert|skeleton]
                                       age.onnx (and age_fp16.onnx, age_int8.onnx when their skeletons are
                                       there) with random weights: normal(mean, std) clipped to [min, max]
                                       (rounded for integer tensors), one generator per tensor seeded from
                                       its name. fp16 "convert" (default): from the regenerated fp32 model
                                       by the same call our export uses (export/age.py `_to_fp16`:
                                       onnxruntime.transformers.float16, keep_io_types=True), so fp32 and
                                       fp16 hold the same weights; "skeleton": from age_fp16.skel.onnx
    smoke DIR [--faces PHOTO|VIDEO]   finite ages from every variant in DIR on real face crops (CPU)
    check ORIGINAL_DIR REGEN_DIR [--crops N] [--seconds S]
                                       the same graph (nodes, initializer names, shapes, dtypes, metadata),
                                       finite outputs on real face crops (--faces PHOTO|VIDEO), the speed of
                                       both on this CPU (batch 1 and 8, interleaved)

Pure onnx + numpy (+ onnxruntime for fp16 "convert" and for `check`); runs on Python 3.11 and 3.12.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MARK = "tillsight-skeleton "
VARIANT_FILES = ("age.onnx", "age_fp16.onnx", "age_int8.onnx")


def _large(tensor: TensorProto, min_elements: int) -> bool:
    size = int(np.prod(tensor.dims)) if tensor.dims else 1
    return size >= min_elements and len(tensor.dims) >= 2 and tensor.data_location != TensorProto.EXTERNAL


def strip(path: Path, out: Path, min_elements: int = 4096) -> Path:
    model = onnx.load(str(path))
    emptied = 0
    for tensor in model.graph.initializer:
        if not _large(tensor, min_elements):
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64)
        stats = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                 "max": float(values.max())}
        dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
        tensor.Clear()
        tensor.name, tensor.data_type = name, dtype
        tensor.dims.extend(dims)
        tensor.doc_string = MARK + json.dumps(stats)
        emptied += 1
    out.mkdir(parents=True, exist_ok=True)
    target = out / (path.stem + ".skel.onnx")
    onnx.save(model, str(target))
    print(f"{path.name}: {emptied} initializers emptied, {path.stat().st_size / 1e6:.1f} MB -> "
          f"{target.stat().st_size / 1e6:.2f} MB ({target})")
    return target


def fill(model: onnx.ModelProto) -> int:
    """Random values for every emptied initializer, in place; returns how many."""
    filled = 0
    for tensor in model.graph.initializer:
        if not tensor.doc_string.startswith(MARK):
            continue
        stats = json.loads(tensor.doc_string[len(MARK):])
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        rng = np.random.default_rng(zlib.crc32(tensor.name.encode()))
        values = rng.normal(stats["mean"], max(stats["std"], 1e-12), tuple(tensor.dims))
        values = np.clip(values, stats["min"], stats["max"])
        if np.issubdtype(dtype, np.integer):
            values = np.rint(values)
        array = values.astype(dtype)
        fresh = numpy_helper.from_array(array, tensor.name)
        tensor.CopyFrom(fresh)
        filled += 1
    return filled


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """export/age.py `_to_fp16`, without importing the export package (it needs the train extra)."""
    import copy
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)


def regen(skeletons: Path, out: Path, fp16: str = "convert") -> list[Path]:
    """`skeletons`: a folder of *.skel.onnx, or a .tar.xz of them (scripts/device/age-resnet50-random.skel.tar.xz)."""
    if skeletons.is_file():
        import tarfile
        import tempfile
        folder = Path(tempfile.mkdtemp(prefix="skeletons-"))
        with tarfile.open(skeletons) as tar:
            tar.extractall(folder, filter="data")
        skeletons = folder
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fp32 = None
    for name in VARIANT_FILES:
        skeleton = skeletons / name.replace(".onnx", ".skel.onnx")
        target = out / name
        started = time.perf_counter()
        if name == "age_fp16.onnx" and fp16 == "convert" and fp32 is not None:
            try:
                model = to_fp16(fp32)
                how = "converted from the regenerated fp32 (export's float16 path)"
            except ImportError as exc:
                if not skeleton.is_file():
                    raise SystemExit(f"fp16: onnxruntime.transformers.float16 missing ({exc}) and no {skeleton}")
                model, how = None, None
            if model is not None:
                onnx.save(model, str(target))
                written.append(target)
                print(f"{target}: {how}, {target.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s")
                continue
        if not skeleton.is_file():
            continue
        model = onnx.load(str(skeleton))
        count = fill(model)
        onnx.save(model, str(target))
        if name == "age.onnx":
            fp32 = model
        written.append(target)
        print(f"{target}: {count} initializers regenerated from {skeleton.name}, {target.stat().st_size / 1e6:.1f} MB, "
              f"{time.perf_counter() - started:.1f} s")
    if not written:
        raise SystemExit(f"no skeletons (*.skel.onnx) in {skeletons}")
    export_json = skeletons / "export.json"
    if export_json.is_file():
        (out / "export.json").write_text(export_json.read_text())
    return written


def _signature(model: onnx.ModelProto) -> tuple:
    nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    inits = sorted((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer)
    meta = sorted((p.key, p.value) for p in model.metadata_props)
    io = ([(i.name, str(i.type)) for i in model.graph.input], [(o.name, str(o.type)) for o in model.graph.output])
    return nodes, inits, meta, io


def _crops(count: int, size: int, source: Path | None) -> tuple[np.ndarray, str]:
    """Real face crops (the repo's detector on a photo, or on a video's frames), else random pixels."""
    random = np.random.default_rng(0).integers(0, 256, (count, size, size, 3)).astype(np.float32)
    if source is None or not source.is_file():
        return random, f"random pixels ({source} not found)"
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        import cv2
        from edge.crop import crop_face
        from edge.detect import FaceDetector, detect_in_photo
        detector, crops = FaceDetector(), []
        if source.suffix.lower() in (".jpg", ".jpeg", ".png"):
            image = cv2.imread(str(source))
            crops = [crop_face(image, f, size, 0.0) for f in detect_in_photo(detector, image)]
        else:
            capture = cv2.VideoCapture(str(source))
            while len(crops) < count:
                ok, image = capture.read()
                if not ok:
                    break
                crops += [crop_face(image, f, size, 0.0) for f in detector(image)]
        if not crops:
            return random, f"random pixels (no face found in {source.name})"
        found = len(crops)
        crops = (crops * (count // found + 1))[:count]
        return np.stack(crops).astype(np.float32), f"{min(found, count)} real face crops from {source.name}"
    except Exception as exc:  # noqa: BLE001 - any failure: random crops, and it says so
        return random, f"random pixels ({type(exc).__name__}: {exc})"


def check(original: Path, regenerated: Path, crops: int = 8, seconds: float = 3.0,
          faces: Path | None = None) -> dict:
    import onnxruntime as ort
    report = {}
    for name in VARIANT_FILES:
        a, b = original / name, regenerated / name
        if not (a.is_file() and b.is_file()):
            continue
        ma, mb = onnx.load(str(a)), onnx.load(str(b))
        same_graph = _signature(ma) == _signature(mb)
        if not same_graph:  # the fp16 conversion may order things differently: compare as sets
            sa, sb = _signature(ma), _signature(mb)
            same_graph = sorted(sa[0]) == sorted(sb[0]) and sa[1:] == sb[1:]
        size = int(dict((p.key, p.value) for p in ma.metadata_props).get("tillsight.input_size", 224))
        x, source = _crops(crops, size, faces)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in
                    (("original", a), ("regenerated", b))}
        inp = sessions["original"].get_inputs()[0].name
        out = {k: s.run(None, {inp: x})[0] for k, s in sessions.items()}
        speed = {k: [] for k in sessions}
        for batch in (1, 8):
            xb = x[:batch]
            for _ in range(3):  # interleaved rounds: a busy neighbour slows both alike
                for k, s in sessions.items():
                    s.run(None, {inp: xb})
                    calls, started = 0, time.perf_counter()
                    while time.perf_counter() - started < seconds / 6 or calls < 2:
                        s.run(None, {inp: xb})
                        calls += 1
                    speed[k].append((batch, calls * batch / (time.perf_counter() - started)))
        per = {k: {bt: round(float(np.median([f for b2, f in v if b2 == bt])), 1) for bt in (1, 8)}
               for k, v in speed.items()}
        report[name] = {"same_graph": same_graph, "crops": source,
                        "finite": bool(np.isfinite(out["regenerated"]).all()),
                        "ages_original": [round(float(v), 2) for v in np.ravel(out["original"])[:4]],
                        "ages_regenerated": [round(float(v), 2) for v in np.ravel(out["regenerated"])[:4]],
                        "faces_per_s": per,
                        "speed_ratio": {bt: round(per["regenerated"][bt] / per["original"][bt], 3) for bt in (1, 8)}}
        print(name, json.dumps(report[name]), flush=True)
    return report


def smoke(folder: Path, faces: Path | None, batch: int = 4) -> dict:
    """Each variant in `folder` on this machine's onnxruntime (CPU): finite ages for real face crops."""
    import onnxruntime as ort
    report = {}
    for name in VARIANT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        x, source = _crops(batch, int(meta.get("tillsight.input_size", 224)), faces)
        ages = np.ravel(session.run(None, {session.get_inputs()[0].name: x})[0])
        report[name] = {"finite": bool(np.isfinite(ages).all()), "ages": [round(float(a), 2) for a in ages],
                        "crops": source, "providers": session.get_providers()}
        print(name, json.dumps(report[name]), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("strip")
    s.add_argument("models", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--min-elements", type=int, default=4096)
    r = commands.add_parser("regen")
    r.add_argument("skeletons", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--fp16", choices=["convert", "skeleton"], default="convert")
    c = commands.add_parser("check")
    c.add_argument("original", type=Path)
    c.add_argument("regenerated", type=Path)
    c.add_argument("--crops", type=int, default=8)
    c.add_argument("--seconds", type=float, default=3.0)
    c.add_argument("--faces", type=Path, default=Path(__file__).resolve().parents[3] / "shared/media/two_people.jpg",
                   help="a photo or video to crop faces from (default: ../shared/media/two_people.jpg)")
    k = commands.add_parser("smoke")
    k.add_argument("folder", type=Path)
    k.add_argument("--faces", type=Path)
    args = parser.parse_args(argv)
    if args.command == "strip":
        for model in args.models:
            strip(model, args.out, args.min_elements)
        export_json = args.models[0].parent / "export.json"
        if export_json.is_file():
            (args.out / "export.json").write_text(export_json.read_text())
    elif args.command == "regen":
        regen(args.skeletons, args.out, args.fp16)
    elif args.command == "smoke":
        report = smoke(args.folder, args.faces)
        if not report or not all(r["finite"] for r in report.values()):
            print("smoke test failed", file=sys.stderr)
            return 1
    else:
        report = check(args.original, args.regenerated, args.crops, args.seconds, args.faces)
        if not report or not all(r["same_graph"] and r["finite"] for r in report.values()):
            print("check failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
