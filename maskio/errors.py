"""Errors that both command lines turn into one line on stderr (no torch needed to import)."""

from __future__ import annotations

import re

# torch re-raises an exception from a DataLoader worker as the same type with the worker's whole
# traceback as its message ("Caught ShardError in DataLoader worker process 1.\nOriginal
# Traceback ...\nmaskio.errors.ShardError: <the message>")
_WORKER_PREFIX = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_LAST_LINE = re.compile(r"[\w.]+: (.+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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


def error_line(exc: BaseException) -> str:
    """The one line to print for an expected failure: its message, or, for one raised inside a
    DataLoader worker (whatever ``data.workers`` is), the original message torch wrapped."""
    text = str(exc)
    if _WORKER_PREFIX.match(text):
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        match = _LAST_LINE.fullmatch(last)
        text = match.group(1) if match else last
    return printable(text)


def printable(text: str) -> str:
    """``text`` with its control characters escaped: a message may quote untrusted text (a
    json.path, a member name, an option's value), whose newline or terminal escape would forge
    a second line or rewrite the screen."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
