"""User-facing errors.

Anything the user can fix (a config key, a data row, a path) raises a subclass of `ShardtuneError`.
The CLI prints such errors as one paragraph without a traceback (`--debug` shows it); everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShardtuneError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""

    exit_code = 1


class ConfigError(ShardtuneError):
    exit_code = 2


class DataError(ShardtuneError):
    exit_code = 3


class TemplateMismatch(DataError):
    """The chat template cannot be split into turns consistently with its whole-conversation render."""


def row_error(path: str, row: int, key: str | None, problem: str, fix: str) -> DataError:
    """A `DataError` that names the file, the (0-based) row, the key and the fix."""
    where = f"{path}, row {row}" + (f", key '{key}'" if key else "")
    return DataError(f"{where}: {problem}. Fix: {fix}")


class StorageError(ShardtuneError):
    """Remote storage (an fsspec URL) could not be read or written."""

    exit_code = 4
