"""Errors that both command lines turn into one line on stderr (no torch needed to import)."""

from __future__ import annotations


class ShardError(Exception):
    """Shards that cannot be used (missing, empty, or without the fields a method needs)."""


class ShardFormatError(ShardError):
    """A tar or a sample field that does not follow the contract (or tries to escape its folder)."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit the backbone."""


class KeyValueError(ValueError):
    """A ``KEY=VALUE`` option without a key or an ``=``."""


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: ``PATH: no space left on device`` rather than
    ``[Errno 28] No space left on device: 'PATH'`` (and no chained traceback)."""
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{exc.filename}: {reason}" if exc.filename else reason
