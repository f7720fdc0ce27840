"""The error every command reports as one line and an exit status, never a traceback."""

EXIT_FAILURE, EXIT_USAGE = 1, 2


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code
