"""Errors caused by the user's input: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (a file, an argument, a checkpoint): the message names it and says what is wrong."""


def error_message(exc: UserError | OSError) -> str:
    """The one line a run stopped by ``exc`` prints after ``error:``: the user error's message, or for a refusal of
    the file system (no such folder, permissions, disk full) the path and the reason."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc)
    return str(exc)
