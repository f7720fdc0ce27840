"""ONNX Runtime sessions: provider choice, and one-line errors for bad model files."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from edge.errors import ModelError

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_SHORT = {name: alias for alias, name in PROVIDER_ALIASES.items()}
_SERVING = {"cuda": "CUDA", "tensorrt": "TensorRT", "cpu": "the CPU"}  # by the config's names
_reported: set[str] = set()  # fallbacks already logged: once per process, not once per session


@dataclass(frozen=True)
class Fallback:
    """GPU providers that were configured and do not serve a session."""

    reasons: str  # "cuda not loaded: libcublasLt.so.13 not found (...)", one line
    serving: str  # what serves instead: "the CPU", "CUDA"
    problem: bool  # the installed build has the provider, so the GPU was meant: the status says degraded

    @property
    def text(self) -> str:
        """Logged once at start; the status topic's `provider_fallback` (and problem, if it is one)."""
        return f"{self.reasons}; running on {self.serving}"


def check_single_onnxruntime() -> None:
    """onnxruntime and onnxruntime-gpu both install the `onnxruntime` module;
    with both present, whichever was installed last silently wins, so refuse."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        raise ModelError(
            f"both {' and '.join(installed)} are installed; they overwrite each other. "
            "Uninstall both, then install exactly one (see README, 'CPU or GPU')"
        )


def _wanted(preference: list[str] | None) -> list[str]:
    return [PROVIDER_ALIASES.get(p.lower(), p) for p in (preference or ["cuda", "cpu"])]


def resolve_providers(preference: list[str] | None) -> list[str]:
    """Keep the preferred providers this build of ONNX Runtime has; CPU last, and only if preferred."""
    available = ort.get_available_providers()
    wanted = _wanted(preference)
    chosen = [p for p in wanted if p in available and p != CPU]
    return chosen + ([CPU] if CPU in wanted else [])


def installed_build() -> str:
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return f"onnxruntime {ort.__version__}"


@functools.cache
def _reason(name: str) -> tuple[str, str]:
    """Why a configured provider does not serve, and what to do: ("cuda not loaded: ...", "hint")."""
    short, build = _SHORT.get(name, name), installed_build()
    if name not in ort.get_available_providers():
        if build.startswith("onnxruntime "):
            return f"{short} not in this build: {build} is the CPU build", \
                f"onnxruntime-gpu has {_SERVING.get(short, short)}"
        return f"{short} not in this build: {build}", "onnxruntime-gpu has cuda and tensorrt"
    # In the build but not loaded: loading its library ourselves names the library that is missing
    # (ONNX Runtime says it only in its own multi-line log, which _create_session silences).
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / f"libonnxruntime_providers_{short}.so"))
    except OSError as exc:
        error = (str(exc).splitlines() or [type(exc).__name__])[0]
        if "cannot open shared object file" not in error:
            return f"{short} not loaded: {error}", "a broken onnxruntime-gpu install? reinstall it"
        missing = error.split(":")[0].strip()
        if missing.startswith("libcuda.so"):
            return f"{short} not loaded: {missing} not found", "no NVIDIA driver installed, or no GPU"
        return (f"{short} not loaded: {missing} not found", f"{build} needs the CUDA {_cuda_major()} and cuDNN 9 "
                "libraries on the library path, e.g. LD_LIBRARY_PATH")
    return f"{short} not loaded: its libraries load, but it could not start", "no GPU visible, or the driver too old?"


def provider_reasons(names: list[str]) -> str:
    """One line: why these configured providers do not serve, then what to do (each hint once)."""
    reasons = [_reason(name) for name in names]
    hints = list(dict.fromkeys(hint for _, hint in reasons))
    return "; ".join(what for what, _ in reasons) + f" ({'; '.join(hints)}: README, 'CPU or GPU')"


def _cuda_major() -> str:
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version  # the GPU build's
    except ImportError:
        return "12/13"
    return str(cuda_version).split(".")[0] or "12/13"


def provider_fallback(session: ort.InferenceSession, preference: list[str] | None) -> Fallback | None:
    """The configured GPU providers that do not serve `session`, and why; None when all serve."""
    serving = session.get_providers()
    missing = [p for p in _wanted(preference) if p != CPU and p not in serving]
    if not missing:
        return None
    first = _SHORT.get(serving[0], serving[0])
    return Fallback(provider_reasons(missing), _SERVING.get(first, first),
                    any(p in ort.get_available_providers() for p in missing))


def session_options(threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """threads: intra-op threads (0: ONNX Runtime's default, one per core).

    Spinning off by default: ORT's worker threads otherwise busy-wait after
    each call, and on a 2-core till PC the detector's and the age model's
    spinning threads steal the cores the other session needs (measured:
    `tillsight bench`, README)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings (e.g. CUDA missing) are logged by us, once
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


def cores_hidden(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where ONNX Runtime cannot count the cores for its default thread pool (Linux): it reads /proc/cpuinfo,
    and with it hidden (systemd's ProcSubset=pid) runs one thread a session: the age model 1.7-1.9x slower on a
    2-core till PC (deploy/README.md). Other systems count otherwise."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return "processor" not in cpuinfo.read_text()
    except OSError:
        return True


# Metadata of a model whose int8 weights are dequantized inside the graph and whose maths is float
# (`export.age.quantize_weights_int8`): a quarter of the file, fp32's accuracy and speed.
KEY_QUANTIZATION, WEIGHTS_ONLY = "tillsight.quantization", "weights"


def fold_int8_weights(options: ort.SessionOptions, path: Path | str) -> ort.SessionOptions:
    """For a weights-only int8 model, have ONNX Runtime turn the weights into float once, at load: with its
    QDQ handling on it keeps the DequantizeLinear nodes and runs them on every call (measured on a ResNet50
    at 224 px: 19.2 faces/s against 27.1 for fp32; folded, 26.8). Other models are left as they are:
    a fully quantised one needs that handling for its int8 kernels."""
    if is_weights_only_int8(path):
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


def is_weights_only_int8(path: Path | str) -> bool:
    """Whether the file is an int8 weights-only model (export's `quantize_weights_int8`), by its metadata."""
    import onnx
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not a readable model: creating the session says why, in one line
        return False
    return meta.get(KEY_QUANTIZATION) == WEIGHTS_ONLY


# The CUDA provider's options unless [models.cuda] says otherwise (edge.config.CudaConfig, the same values).
# Measured on the H100 (issue 10, the shipped ResNet50 in fp16): cuDNN's exhaustive search, ORT's default,
# spent about a second on the first call of every new batch size, which the daemon's batcher forms all the
# time, and its heuristic choice runs as fast (14,592 against 14,088 faces/s at batch 64); channels-last
# convolutions (prefer_nhwc) 18,542 against 14,088.
DEFAULT_CUDA_OPTIONS = {"prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"}


def open_session(path: Path | str, providers: list[str] | None, what: str,
                 options: ort.SessionOptions | None = None,
                 cuda_options: dict[str, str] | None = None, made: bytes | None = None,
                 setting: str = "models.providers") -> ort.InferenceSession:
    """A session on the first configured provider that serves. A GPU provider that does not is said once
    (a warning if the GPU build is installed, else info), and refused if `cpu` is not configured.
    cuda_options: the CUDA provider's options (None: DEFAULT_CUDA_OPTIONS). made: a model made from the file
    at `path` in memory (edge.precision), loaded instead of the file. setting: the config key that named
    `providers`, for the refusal."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} model not found: {path}")
    wanted = resolve_providers(providers)
    cuda = DEFAULT_CUDA_OPTIONS if cuda_options is None else cuda_options
    options = options or session_options()
    session = _create_session(path, options if made else fold_int8_weights(options, path), wanted, what, cuda, made)
    return_freed_memory()
    fallback = provider_fallback(session, providers)
    if fallback is not None and CPU not in wanted:
        raise ModelError(f"{fallback.reasons}; {setting} has no \"cpu\" to fall back on")
    if fallback is not None and fallback.text not in _reported:  # the detector and the age model: one line
        _reported.add(fallback.text)
        log.log(logging.WARNING if fallback.problem else logging.INFO, fallback.text)
    log.info("model loaded", extra={"model": what, "path": str(path), "providers": session.get_providers()})
    return session


def return_freed_memory() -> None:
    """Give the system back the memory freed while a session was built. Building one parses the file and folds
    and reorders the weights, and the copies it drops stay in glibc's heaps: the shipped ResNet50's session
    held 275 MB where its weights are 95 MB, and kept it for the daemon's life (measured: 372 MB RSS after a
    batch of 8; with this, 242 MB, at the same speed; tests/test_infer.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): its allocator is left as it is
        return
    libc.malloc_trim(0)


def _create_session(path: Path, options: ort.SessionOptions, wanted: list[str], what: str,
                    cuda_options: dict[str, str], made: bytes | None = None) -> ort.InferenceSession:
    """The session on `wanted`, else on what follows a provider that fails to register (TensorRT without its
    libraries raises), down to the CPU, even when it is not configured: then open_session refuses with the
    provider's reason, and a model that fails on the CPU too is the file's fault. ONNX Runtime's own
    fallback is off: it prints to stdout (where `predict` writes JSON) and switches a running session to
    the CPU unseen."""
    attempts = [wanted[start:] for start in range(len(wanted))] + ([] if CPU in wanted else [[CPU]])
    ort.set_default_logger_severity(4)  # its multi-line log when a provider library fails to load: we say it in one
    try:
        for providers in attempts:
            try:
                with_options = [(p, cuda_options) if p == CUDA else p for p in providers]
                return ort.InferenceSession(made or str(path), options, providers=with_options, enable_fallback=0)
            except Exception as exc:  # ORT raises several private exception types for bad files
                error = exc
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"{what} model {path} cannot be loaded: {first_line}") from None
    finally:
        ort.set_default_logger_severity(3)  # errors only from here on, as the sessions' own (session_options)
