"""Exceptions shared across sslmask (importable without torch, e.g. by maskgen's CLI)."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit the backbone."""
