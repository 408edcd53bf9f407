"""Parsing JSON and YAML that a user or a file hands us, with limits checked before anything is
built: nesting depth (the parsers recurse once per level, so 20,000 levels is a RecursionError
and a 3,000-line traceback) and, for YAML, the size the document has once its aliases are
expanded (nine levels of nine aliases, "billion laughs", is 387 million nodes from 1 kB).

YAML is read as an event stream first (PyYAML's parser is iterative): depth and expanded size
are counted there, and only a document within both limits is composed and constructed.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

MAX_DEPTH = 64  # the deepest real config, recipe or metadata file nests under 8 levels
MAX_YAML_NODES = 100_000  # nodes after alias expansion; a recipe or config has a few hundred


class UnsafeDocument(ValueError):
    """A document past a limit (too deep, too large once expanded): one line saying which."""


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> Any:
    """``obj`` when its lists and dicts nest at most ``limit`` deep (counted without recursion)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise UnsafeDocument(f"nested more than {limit} levels deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return obj


def loads_json(text: str | bytes, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ValueError, not RecursionError, for a document nested past
    ``limit``; anything else invalid raises json's own ValueError."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UnsafeDocument(f"nested more than {limit} levels deep") from None
    return check_depth(data, limit) if isinstance(data, (dict, list)) else data


def _check_events(text: str, limit: int, max_nodes: int) -> None:
    """Walk the YAML events: refuse nesting past ``limit`` or more than ``max_nodes`` nodes with
    every alias counted as the size of what it names."""
    sizes: dict[str, int] = {}
    open_: list[list[Any]] = []  # per open collection: [nodes so far, its anchor]
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_.append([1, event.anchor])
            total += 1
            if len(open_) > limit:
                raise UnsafeDocument(f"nested more than {limit} levels deep")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            n, anchor = open_.pop()
            if anchor:
                sizes[anchor] = n
            if open_:
                open_[-1][0] += n
            continue
        if isinstance(event, yaml.ScalarEvent):
            n = 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            n = sizes.get(event.anchor, 1)
        else:
            continue
        total += n
        if open_:
            open_[-1][0] += n
        if total > max_nodes:
            raise UnsafeDocument(f"expands to more than {max_nodes:,} nodes (aliases of aliases?)")


def safe_yaml(text: str, limit: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` of a document within ``limit`` levels and ``max_nodes`` expanded nodes;
    UnsafeDocument (a ValueError) past either, yaml.YAMLError for invalid YAML."""
    _check_events(text, limit, max_nodes)
    return yaml.safe_load(text)
