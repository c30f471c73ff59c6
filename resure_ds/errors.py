"""Error types shared by every module, and the one way a command reports a user's error (imports
nothing of the package)."""
from __future__ import annotations

import sys
from typing import Callable


class ConfigError(ValueError):
    """A bad recipe or override; the message lists every problem at once."""


class DataError(ValueError):
    """A user-fixable problem with input data; the message names file, record and fix."""


class TrainingError(RuntimeError):
    """The run itself went wrong (it diverged); the message says since when and what to change."""


class InvalidRecord(Exception):
    """One bad record: `kind` is a short counter key, `detail` says what is wrong.

    Readers and the renderer raise it; the caller turns it into a DataError
    naming the record, or counts it under data.skip_invalid.
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


SKIP_HINT = "Fix the record, or set data.skip_invalid=true to skip and count such records"


def record_error(where: str, bad: InvalidRecord) -> DataError:
    """The one message for a bad record: where it is, what is wrong, the fix."""
    return DataError(f"{where}: {bad.detail}. {SKIP_HINT}")


USER_ERRORS = (ConfigError, DataError, TrainingError, OSError)  # what a user can cause and fix


def say_error(message: str, where: str = "") -> int:
    """The one line every command prints for a user's error (on stderr), and its exit status, 2."""
    print(f"[resure_ds] error{where}: {message}", file=sys.stderr, flush=True)
    return 2


def run_command(body: Callable[[], int | None]) -> int:
    """An entry point's body, with what a user can cause (bad configuration or data, a file that is not
    there or cannot be written) as one line and status 2 instead of a traceback; anything else is a
    bug and keeps its traceback."""
    try:
        return body() or 0
    except USER_ERRORS as e:
        return say_error(str(e))
