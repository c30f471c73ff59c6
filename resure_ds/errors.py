"""Error types shared by every module (imports nothing)."""
from __future__ import annotations


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
