"""maskgen: foreground-mask datasets as WebDataset shards."""

__version__ = "0.1.0"
