"""Typed, range-checked settings: the one way both packages declare and check what a setting may hold.

A setting is a dataclass field made by :func:`setting`, which records its limits (``ge``,
``gt``, ``le``, ``lt``, ``choices``) and its help text in the field's metadata. The field's type
hint says the type. :func:`checked` turns a raw value (from YAML, ``--set``, ``--param`` or a
Python caller) into that type within those limits, or raises one :class:`SettingError` line.
sslmask's config sections, maskgen's build options and the click options derived from them
(``maskgen/cli.py``) all read the same declaration, so a default or a range is written once.

It lives at the bottom layer because both maskgen and sslmask use it and neither may import
the other.
"""

from __future__ import annotations

import difflib
import math
import types
from dataclasses import MISSING, field
from typing import Any, Union, get_args, get_origin


class SettingError(ValueError):
    """A value a setting cannot hold; the text names the setting and says what it may be."""


def setting(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",  # noqa: A002 - click's name for it
) -> Any:
    """A field that must be >= ge, > gt, <= le, < lt and/or one of ``choices`` (None: not
    checked). Without ``default`` the value must be given (a config section's come from YAML)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    return field(default=default, metadata=meta)


def closest(name: str, valid: list[str], prefix: str = "") -> str:
    """``"; did you mean 'section.key'?"`` for the valid name nearest a misspelt one, or ``""``."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def checked(key: str, value: Any, hint: Any, limits: Any) -> Any:
    """``value`` as ``hint`` says, within the field's ``limits`` (its metadata), or a SettingError."""
    value = typed(key, value, hint)
    check_limits(key, value, limits)
    return value


def typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` says (int, float, bool, str, list[...], X | None, X | Y), or a
    SettingError. An int is accepted for a float (and becomes one); a bool is never a number."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:  # e.g. float | str: the first type that fits
            for option in rest:
                try:
                    return typed(key, value, option)
                except SettingError:
                    continue
            raise SettingError(f"{key} must be {' or '.join(a.__name__ for a in rest)}, got {value!r}")
        (hint,) = rest
        origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise SettingError(f"{key} must be a list, got {value!r}")
        return [typed(key, v, args[0]) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise SettingError(f"{key} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _number(x: float) -> str:
    """A limit as written: 4294967295, not 4.29497e+09; 0.5 and 1e-06 as ``:g`` writes them."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"


def range_text(m: Any) -> str:
    """``">= 1"``, ``"in [0, 1)"``, ...: what the limits in ``m`` allow."""
    ge, gt, le, lt = (None if m[k] is None else _number(m[k]) for k in ("ge", "gt", "le", "lt"))
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if high is None:
        return f">= {ge}" if ge is not None else f"> {gt}"
    if low is None:
        return f"<= {le}" if le is not None else f"< {lt}"
    return f"in {low}, {high}"


def check_limits(key: str, value: Any, m: Any) -> None:
    """A SettingError when ``value`` (or an item of a list) is outside the limits in ``m``."""
    if not m or value is None:
        return
    if m.get("choices") is not None and value not in m["choices"]:
        raise SettingError(f"{key}={value!r}: must be one of {', '.join(map(str, m['choices']))}")
    limited = [m.get(k) is not None for k in ("ge", "gt", "le", "lt")]
    for v in value if isinstance(value, list) else [value]:
        if not any(limited) or isinstance(v, (str, bool)):
            continue
        bad = not math.isfinite(v)
        bad |= (m["ge"] is not None and v < m["ge"]) or (m["gt"] is not None and v <= m["gt"])
        bad |= (m["le"] is not None and v > m["le"]) or (m["lt"] is not None and v >= m["lt"])
        if bad:
            raise SettingError(f"{key}={value}: must be {range_text(m)}")
