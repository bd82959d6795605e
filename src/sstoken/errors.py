"""Errors that are the user's to fix. The command line prints them as one message, without a
traceback, and exits with the code named here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2     # a bad option, option combination or config file
EXIT_DATA = 1      # bad input data, a stale or foreign cache


class UsageError(ValueError):
    """One or more problems with the options; ``problems`` holds one line each."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, and the problem."""

    exit_code = EXIT_DATA
