"""The one exception type that means "the user's input is wrong" (exit code 2, one line, no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing/invalid file, row, option or state. The message names it and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        # One line only: a multi-line message would read like a traceback in a log.
        super().__init__(" ".join(str(message).split()))


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became non-finite: a setting to change (the learning rate), not a bug, so one line
    and exit code 2 like any other bad input; still a ``FloatingPointError`` for code that catches that."""
