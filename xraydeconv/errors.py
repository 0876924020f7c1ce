"""Errors caused by the user's input: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (a file, an argument, a checkpoint): the message names it and says what is wrong."""
