"""Registry of sources: ``--source NAME`` -> class."""

from __future__ import annotations

from typing import Any

from maskgen.sources.base import ItemRef, Source, SourceError
from maskgen.sources.coco import CocoSource
from maskgen.sources.folder import FolderSource
from maskgen.sources.imagenet import ImageNetSource
from maskgen.sources.sample import SampleSource

SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (SampleSource, FolderSource, ImageNetSource, CocoSource)
}


def make_source(name: str, config: dict[str, Any]) -> Source:
    """Build a source from its name and ``config()`` (also how workers rebuild it)."""
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; choose from {', '.join(sorted(SOURCES))}")
    return SOURCES[name](**config)


__all__ = ["SOURCES", "ItemRef", "Source", "SourceError", "make_source"]
