"""sslmask: mask-aware self-supervised training from maskgen shards."""

__version__ = "0.1.0"
