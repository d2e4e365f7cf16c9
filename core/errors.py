"""Typed errors raised by core. The service maps them to 4xx responses."""

from __future__ import annotations


class CoreError(ValueError):
    """Base class: something the caller passed is wrong (never an internal bug)."""


class ConfigError(CoreError):
    """An invalid method or training configuration; ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DataError(CoreError):
    """Bad training data; ``row`` is the 0-based row index (None for whole-set problems)."""

    def __init__(self, message: str, row: int | None = None, field: str | None = None) -> None:
        where = f"row {row}" if row is not None else "dataset"
        super().__init__(f"{where}{f' field {field!r}' if field else ''}: {message}")
        self.row = row
        self.field = field
        self.message = message


class AdapterFormatError(CoreError):
    """Adapter bytes or files that cannot be loaded (bad format, pickle, shape, other base)."""


class Cancelled(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised inside training when the cancellation callback returns True."""
