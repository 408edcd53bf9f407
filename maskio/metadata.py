"""One validated reader per kind of build metadata file: a build's ``manifest.json`` and
``report.json``, a shard's ``*.stats.json``, a published dataset's ``maskgen.json``.

Every reader of these files goes through here, so a doctored file (not JSON, a list where an
object belongs, nested thousands deep, a field of the wrong type) is one ShardError line naming
the file and the problem, never an AttributeError or RecursionError deep in the caller. Only
the fields some reader uses are checked; others pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskio.errors import ShardError
from maskio.safeload import UnsafeDocument, loads_json

MAX_BYTES = 256 * 2**20  # an ImageNet build's manifest with its run history is a few MB
MAX_DEPTH = 32  # the deepest real file nests about 6 levels

Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


_STR: Check = lambda v: isinstance(v, str)  # noqa: E731
_DICT: Check = lambda v: isinstance(v, dict)  # noqa: E731
_LIST: Check = lambda v: isinstance(v, list)  # noqa: E731
_BOOL: Check = lambda v: isinstance(v, bool)  # noqa: E731
_EXTREMES = _list_of(lambda e: isinstance(e, list) and len(e) == 2 and _is_number(e[0]) and _STR(e[1]))

# field -> (check, what it must be)
MANIFEST_FIELDS: dict[str, tuple[Check, str]] = {
    "complete": (_BOOL, "true or false"),
    "n_shards": (_is_int, "a whole number >= 0"),
    "n_samples": (_optional(_is_int), "a whole number >= 0 or null"),  # null until the build ends
    "fingerprint": (_STR, "a string"),
    "source": (_STR, "a string"),
    "source_config": (_DICT, "an object"),
    "method": (_STR, "a string"),
    "method_params": (_DICT, "an object"),
    "class_names": (_optional(_list_of(_STR)), "a list of strings or null"),
    "postprocess": (_DICT, "an object"),
    "runs": (_LIST, "a list"),
}
REPORT_FIELDS: dict[str, tuple[Check, str]] = {
    "n_images": (_is_int, "a whole number >= 0"),
    "n_errors": (_is_int, "a whole number >= 0"),
    "miou": (_optional(_is_number), "a number or null"),
}
STATS_FIELDS: dict[str, tuple[Check, str]] = {
    "fingerprint": (_STR, "a string"),
    "nsamples": (_is_int, "a whole number >= 0"),
    "n_errors": (_is_int, "a whole number >= 0"),
    "errors": (_list_of(_DICT), "a list of objects"),
    "warnings": (_list_of(_DICT), "a list of objects"),
    "errors_by_reason": (_DICT, "an object"),
    "status_counts": (_DICT, "an object"),
    "reencoded": (_is_int, "a whole number >= 0"),
    "fg_fraction_sum": (_is_number, "a number"),
    "fg_fraction_hist": (_list_of(_is_int), "a list of whole numbers"),
    "metrics": (_DICT, "an object"),
    "best_iou": (_EXTREMES, "a list of [value, key] pairs"),
    "worst_iou": (_EXTREMES, "a list of [value, key] pairs"),
}
STATS_REQUIRED = tuple(k for k in STATS_FIELDS if k not in ("warnings", "fingerprint"))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """``path`` as a JSON object, or one ShardError line saying what is wrong with it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ShardError(f"{path}: {path.stat().st_size:,} bytes, more than any build metadata file")
        data = loads_json(path.read_bytes().decode("utf-8"), MAX_DEPTH)
    except UnsafeDocument as exc:
        raise ShardError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"{path}: not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def checked(
    data: dict[str, Any], path: Path, fields: dict[str, tuple[Check, str]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``data`` when each of ``fields`` it holds passes its check and ``required`` are there."""
    for key in required:
        if key not in data:
            raise ShardError(f"{path}: no {key!r}")
    for key, (check, must_be) in fields.items():
        if key in data and not check(data[key]):
            raise ShardError(f"{path}: {key!r} must be {must_be}, got {type(data[key]).__name__}")
    return data


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A build's ``manifest.json`` (or a published dataset's ``maskgen.json``, the same fields)."""
    return checked(read_json_object(path), Path(path), MANIFEST_FIELDS)


def read_report(path: str | Path) -> dict[str, Any]:
    return checked(read_json_object(path), Path(path), REPORT_FIELDS)


def read_shard_stats(path: str | Path) -> dict[str, Any]:
    return checked(read_json_object(path), Path(path), STATS_FIELDS, STATS_REQUIRED)
