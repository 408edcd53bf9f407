"""``KEY=VALUE`` options (``--param``, ``--info``, ``--set``, ``--var``): one parser for all."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from maskio.errors import KeyValueError
from maskio.safeload import UnsafeDocument, loads_json

_WORDS = {"true": True, "false": False, "null": None}


def split_pair(item: str, option: str) -> tuple[str, str]:
    """``"k=300"`` -> ``("k", "300")``; the key is stripped, the value kept as typed."""
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise KeyValueError(f"{option} {item!r}: expected KEY=VALUE")
    return key.strip(), value


def parse_value(raw: str) -> Any:
    """A typed value: an int, a float, true/false/null, a JSON list or object, else the string.

    Numbers follow Python (``1e-3`` is a float), and nothing else is guessed: ``yes``, ``on``
    or a path stay strings, where YAML 1.1 would turn the first two into booleans.
    """
    text = raw.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    if text in _WORDS:
        return _WORDS[text]
    if text.startswith(("[", "{")):
        try:
            return loads_json(text)
        except UnsafeDocument as exc:
            raise KeyValueError(f"{text[:40]}...: {exc}") from None
        except ValueError:
            pass
    return raw


def parse_pairs(items: Iterable[str], option: str, typed: bool = True) -> dict[str, Any]:
    """``("k=300", "scorer=rbd")`` -> ``{"k": 300, "scorer": "rbd"}``; the last of a key wins."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = split_pair(item, option)
        out[key] = parse_value(value) if typed else value
    return out
