"""The errors every command reports as one line and an exit status, never a traceback."""

EXIT_FAILURE, EXIT_USAGE = 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
# 128 + SIGPIPE, as a shell reports `cat` whose reader went (`| head`): a pipeline's own convention, and apart
# from 1, which `status` says for a daemon not online
EXIT_READER_GONE = 141


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class ModelError(Exception):
    """A model file that is missing, corrupt or breaks the contract (raised by the stages that load or judge with
    one: edge/runtime.py, edge/infer.py, edge/policy.py)."""
