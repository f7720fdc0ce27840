"""ONNX Runtime sessions: provider choice, and one-line errors for bad model files."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}


class ModelError(Exception):
    """A model file that is missing, corrupt or breaks the contract."""


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


def resolve_providers(preference: list[str] | None) -> list[str]:
    """Keep the preferred providers this build of ONNX Runtime has; CPU always last."""
    available = ort.get_available_providers()
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in (preference or ["cuda", "cpu"])]
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


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


def open_session(path: Path | str, providers: list[str] | None, what: str,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} model not found: {path}")
    options = options or session_options()
    try:
        session = ort.InferenceSession(str(path), options, providers=resolve_providers(providers))
    except Exception as exc:  # ORT raises several private exception types for bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what} model {path} cannot be loaded: {first_line}") from None
    log.info("model loaded", extra={"model": what, "path": str(path), "providers": session.get_providers()})
    return session
