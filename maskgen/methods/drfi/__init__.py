"""DRFI-style saliency on CPU: see ``features`` (93-d descriptor), ``segment``, ``scoring``."""

from maskgen.methods.drfi.method import DRFI

__all__ = ["DRFI"]
