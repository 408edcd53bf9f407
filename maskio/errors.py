"""Errors that both command lines turn into one line on stderr (no torch needed to import)."""

from __future__ import annotations


class ShardFormatError(Exception):
    """A tar that does not follow the contract (or tries to escape its folder)."""


class ShardError(Exception):
    """Shards that cannot be used (missing, empty, or without the fields a method needs)."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit the backbone."""


class KeyValueError(ValueError):
    """A ``KEY=VALUE`` option without a key or an ``=``."""
