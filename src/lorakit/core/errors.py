"""The one exception type for user mistakes: the CLI prints it as one line and exits with code 2."""

from __future__ import annotations


class LorakitError(Exception):
    """A problem the user can fix: the message says what, where (file:line, key) and how to fix it."""

    exit_code = 2
