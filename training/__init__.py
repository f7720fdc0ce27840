"""tillsight training: the ResNet50 age model (Keras 3), its data and its evaluation."""

import contextlib
import importlib
import os


@contextlib.contextmanager
def silenced_stderr():
    """File descriptor 2 to /dev/null for the duration.

    TensorFlow 2.21 prints CUDA probing lines ("Could not find cuda drivers",
    "failed call to cuInit", "All log messages before absl::InitializeLog()")
    from C++, ignoring TF_CPP_MIN_LOG_LEVEL; on a CPU machine they are noise
    that buries our one-line errors. Python exceptions still propagate.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_import(module: str):
    with silenced_stderr():
        return importlib.import_module(module)
