"""The shard-format contract shared by ``maskgen`` (writer) and ``sslmask`` (reader).

File names, sample fields and the decoders for them. See ``docs/shard-format.md`` for the prose version.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from maskio.errors import ShardError, ShardFormatError

SHARD_PREFIX = "maskgen-"
SHARD_DIGITS = 6
SHARDS_DIR = "shards"
STATS_SUFFIX = ".stats.json"
TAR_SUFFIX = ".tar"

MANIFEST = "manifest.json"
INDEX = "index.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
ERRORS = "errors.jsonl"

# Sample fields, in the order they appear inside the tar.
FIELD_IMAGE = "jpg"
FIELD_MASK = "mask.png"
FIELD_SALIENCY = "sal.png"
FIELD_CLASS = "cls"
FIELD_META = "json"
FIELD_ORDER = (FIELD_IMAGE, FIELD_MASK, FIELD_SALIENCY, FIELD_CLASS, FIELD_META)

# Version of what a shard holds: 2 added ``source_sha256`` (builds of version 1 lack it). The
# plan's fingerprint includes it, so a build is never resumed into shards of two versions.
SHARD_FORMAT = 2

# Every sample's json carries exactly these keys.
META_KEYS = (
    "key",
    "source",
    "path",
    "source_sha256",
    "width",
    "height",
    "label",
    "method",
    "method_params",
    "threshold",
    "fg_fraction",
    "iou",
    "status",
    "reencoded",
)

JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed so that tars are byte-identical between runs

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:0{SHARD_DIGITS}d}{TAR_SUFFIX}"


def stats_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:0{SHARD_DIGITS}d}{STATS_SUFFIX}"


def shard_index_of(name: str) -> int | None:
    """Shard number of ``maskgen-000012.tar`` (or its stats file); None for other names."""
    m = re.fullmatch(rf"{SHARD_PREFIX}(\d{{{SHARD_DIGITS}}})(\.tar|\.stats\.json)", name)
    return int(m.group(1)) if m else None


def sanitize_key(text: str) -> str:
    """A webdataset key: no dots (webdataset splits the extension at the first dot), no slashes."""
    parts = [p for p in re.split(r"[/\\]", text) if p]
    cleaned = "__".join(_KEY_BAD_CHARS.sub("_", p).strip("_") or "_" for p in parts)
    return cleaned or "_"


def shard_paths(out_dir: str | Path) -> list[Path]:
    """Complete shards of a build directory (those with a stats file), in order."""
    shards_dir = Path(out_dir) / SHARDS_DIR
    done = []
    for stats in sorted(shards_dir.glob(f"{SHARD_PREFIX}*{STATS_SUFFIX}")):
        idx = shard_index_of(stats.name)
        if idx is not None and (shards_dir / shard_name(idx)).exists():
            done.append(shards_dir / shard_name(idx))
    return done


MAX_LABEL = 2**31 - 1  # class indices are int32 everywhere downstream

# Types of the json keys readers rely on (checked when present; None is allowed for each).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "source": (str,),
    "path": (str,),
    "source_sha256": (str,),
    "width": (int,),
    "height": (int,),
    "method": (str,),
    "method_params": (dict,),
    "threshold": (int, float, str),
    "fg_fraction": (int, float),
    "iou": (int, float),
    "status": (str,),
    "reencoded": (bool,),
}


@contextmanager
def in_sample(url: str | Path, key: str) -> Iterator[None]:
    """Turn a malformed field into one ShardError naming the shard and the sample."""
    try:
        yield
    except ShardFormatError as exc:
        raise ShardError(f"{url}: sample {key}: {exc}") from None


# The most pixels any reader decodes (PIL's own default limit, which maskgen's builds switch
# off in favour of their --max-pixels): a 30000 x 30000 mask is refused from its header, not
# after 20 GB of decoding.
MAX_PIXELS = 89_478_485


@contextmanager
def open_limited(source, name: str, max_pixels: int = MAX_PIXELS):
    """``PIL.Image.open(source)`` that refuses, from the header alone, an image of more than
    ``max_pixels`` pixels (ShardFormatError naming ``name``) whatever PIL's global setting."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's own bomb check, at its global limit, warns or raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:
        raise ShardFormatError(
            f"{name}: {str(exc).split('.')[0]}, past the limit of {max_pixels} pixels"
        ) from None
    with opened as im:
        if im.width * im.height > max_pixels:
            raise ShardFormatError(f"{name}: {im.width}x{im.height} pixels exceeds the limit of {max_pixels}")
        yield im


def _decode_png(data: bytes, field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with open_limited(data, field) as im:
            return np.asarray(im.convert("L")).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ShardFormatError(f"{field}: not a readable PNG ({type(exc).__name__})") from None


def decode_mask_png(data: bytes, name: str = FIELD_MASK) -> np.ndarray:
    """Decode a ``mask.png`` to a bool array (True = foreground)."""
    return mask_levels(data, name) > 127


def check_mask_shape(mask: np.ndarray, meta: dict[str, Any], image: np.ndarray | None = None) -> None:
    """The mask has its image's height and width (the decoded image's, else the json's): a mask
    of another size would be resized, or scored against a resized ground truth, in silence."""
    shape = image.shape[:2] if image is not None else (meta.get("height"), meta.get("width"))
    if None not in shape and mask.shape[:2] != tuple(shape):
        raise ShardFormatError(
            f"{FIELD_MASK}: {mask.shape[1]}x{mask.shape[0]}, its image {shape[1]}x{shape[0]}"
        )


def mask_levels(data: bytes, name: str = FIELD_MASK) -> np.ndarray:
    """A ``mask.png`` as the contract has it: 8-bit single channel (PNG mode L) holding only 0
    and 255. An RGB, 16-bit or palette mask, or one with grey levels, is a ShardFormatError:
    read any other way it would silently binarise to a different mask than its writer meant."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_limited(data, name) as im:
            if im.mode != "L":
                raise ShardFormatError(
                    f"{name}: must be an 8-bit single-channel PNG (mode L), not mode {im.mode}"
                )
            levels = np.asarray(im).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ShardFormatError):
            raise
        raise ShardFormatError(f"{name}: not a readable PNG ({type(exc).__name__})") from None
    stray = (levels != 0) & (levels != 255)
    if stray.any():
        raise ShardFormatError(f"{name}: values must be 0 or 255, found {int(levels[stray][0])}")
    return levels


def decode_gray_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit single-channel PNG (``sal.png``) to uint8."""
    return _decode_png(data, FIELD_SALIENCY)


def check_label(value: Any, field: str) -> int | None:
    """A class index in [0, MAX_LABEL], or None; anything else is a ShardFormatError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LABEL:
        raise ShardFormatError(f"{field}: label must be a class index in [0, {MAX_LABEL}], got {value!r:.40}")
    return value


def decode_meta(data: bytes) -> dict[str, Any]:
    """A sample's json: an object whose known keys have their documented types."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ShardFormatError(f"{FIELD_META}: not valid UTF-8 JSON") from None
    except RecursionError:  # nested thousands deep: json recurses once per level
        raise ShardFormatError(f"{FIELD_META}: nested too deeply") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{FIELD_META}: must be a JSON object, got {type(meta).__name__}")
    check_label(meta.get("label"), FIELD_META)
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            raise ShardFormatError(f"{FIELD_META}: {key} has the wrong type ({value!r:.40})")
    return meta


def decode_class(data: bytes) -> int:
    """A ``.cls`` payload: ASCII digits of a class index."""
    text = data.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ShardFormatError(f"{FIELD_CLASS}: label must be a class index, got {text!r:.40}")
    label = check_label(int(text), FIELD_CLASS)
    assert label is not None
    return label


def _split_member(name: str) -> tuple[str, str]:
    if name.startswith("/") or "/" in name or "\\" in name or name.startswith(".."):
        raise ShardFormatError(f"member {name!r} is outside the shard's flat layout")
    key, dot, ext = name.partition(".")
    if not key or not dot:
        raise ShardFormatError(f"member {name!r} has no key.extension form")
    return key, ext


def _magic(path: str | Path) -> bytes:
    """A file's first two bytes (empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(2)
    except OSError:
        return b""


def build_root(path: Path) -> Path:
    """The build folder a folder spec stands for: ``OUT/shards`` stands for ``OUT``, unless the
    build folder itself is named ``shards`` (it then holds a ``shards/`` of its own)."""
    return path.parent if path.name == SHARDS_DIR and not (path / SHARDS_DIR).is_dir() else path


def _unreadable(path: str | Path, exc: BaseException) -> ShardFormatError:
    """One line for a tar that cannot be read (truncated, compressed, empty, not a tar), as
    webdataset and ``datasets`` report a corrupt shard: the file and the reason."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "unexpected end" in reason:
        reason = "truncated"
    elif "empty file" in reason:
        reason = "empty file"
    elif _magic(path) in (b"\x1f\x8b", b"BZ", b"\xfd7"):  # gzip, bzip2, xz
        reason = "compressed; maskgen shards are plain tars"
    return ShardFormatError(f"{path}: not a readable tar ({reason})")


def _check_extent(path: str | Path, member, file_size: int) -> None:
    """A member whose payload would end past the end of the file: a declared size larger than
    the whole file is a doctored header (one line saying so); a payload cut short, a truncated
    shard (EOFError, reported as such)."""
    if member.size > file_size:
        raise ShardFormatError(
            f"{path}: member {member.name!r} declares {member.size:,} bytes in a {file_size:,}-byte file"
        )
    if member.offset_data + member.size > file_size:
        raise EOFError


def _check_new_key(path, key: str, seen: set[str], member: str) -> None:
    """A sample's members are adjacent (WebDataset groups by consecutive key): a key that comes
    back later would be a second sample of the same name, counted and scored twice."""
    if key in seen:
        raise ShardFormatError(f"{path}: sample {key} appears twice (again at member {member!r})")
    seen.add(key)


def iter_tar_samples(path: str | Path, fields: set[str] | None = None):
    """Yield ``(key, {field: bytes})`` from a maskgen shard, in tar order.

    Reads regular members only and never extracts anything to disk; members whose names
    would escape the folder (absolute, ``..``, subfolders) are refused. ``fields`` limits
    which payloads are read (the others are skipped without reading them). A truncated,
    compressed or empty file is a :class:`ShardFormatError` naming it.
    """
    import tarfile

    current_key: str | None = None
    current: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        size = Path(path).stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ShardFormatError(f"{path}: member {member.name!r} is not a regular file")
                _check_extent(path, member, size)  # from the header, before anything is allocated
                key, ext = _split_member(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current
                    _check_new_key(path, key, seen, member.name)
                    current_key, current = key, {}
                elif ext in current:
                    raise ShardFormatError(f"{path}: member {member.name!r} appears twice")
                if fields is None or ext in fields:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise EOFError
                    current[ext] = data
    except (tarfile.TarError, EOFError) as exc:
        raise _unreadable(path, exc) from None
    if current_key is not None:
        yield current_key, current


def index_tar(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {field: (data_offset, size)})]`` of a shard, in tar order, reading headers only.

    For random access (a trainer's exact-resume sampler): a payload is then one ``seek`` and
    one ``read``. The same safety rules as :func:`iter_tar_samples` apply, and a payload that
    would end past the end of the file (a truncated shard) is refused here, not at training.
    """
    import tarfile

    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    seen: set[str] = set()
    try:
        size = Path(path).stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ShardFormatError(f"{path}: member {member.name!r} is not a regular file")
                _check_extent(path, member, size)
                key, ext = _split_member(member.name)
                if not out or out[-1][0] != key:
                    _check_new_key(path, key, seen, member.name)
                    out.append((key, {}))
                elif ext in out[-1][1]:
                    raise ShardFormatError(f"{path}: member {member.name!r} appears twice")
                out[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as exc:
        raise _unreadable(path, exc) from None
    return out


def hf_features(
    method_params: dict[str, Any],
    *,
    image: bool = True,
    saliency: bool = False,
    labels: bool = True,
):
    """The ``datasets.Features`` of a maskgen shard set, for ``load_dataset("webdataset", ...)``.

    The Hugging Face loader infers the schema from the first five samples; a set whose first
    samples have no ground truth (``iou`` null) or no label would be typed ``null`` and fail
    later. Passing these features avoids the guess.
    """
    import datasets

    def value_type(v: Any) -> Any:
        if isinstance(v, bool):
            return datasets.Value("bool")
        if isinstance(v, int):
            return datasets.Value("int64")
        if isinstance(v, float):
            return datasets.Value("float64")
        if isinstance(v, dict):
            return {k: value_type(x) for k, x in v.items()}
        if isinstance(v, list):
            return datasets.Sequence(value_type(v[0]) if v else datasets.Value("string"))
        return datasets.Value("string")

    string, i64, f64 = datasets.Value("string"), datasets.Value("int64"), datasets.Value("float64")
    meta = {
        "key": string,
        "source": string,
        "path": string,
        "source_sha256": string,
        "width": i64,
        "height": i64,
        "label": i64,
        "method": string,
        "method_params": value_type(method_params),
        "threshold": f64,
        "fg_fraction": f64,
        "iou": f64,
        "status": string,
        "reencoded": datasets.Value("bool"),
    }
    feats: dict[str, Any] = {}
    if image:
        feats[FIELD_IMAGE] = datasets.Image()
    feats[FIELD_MASK] = datasets.Image()
    if saliency:
        feats[FIELD_SALIENCY] = datasets.Image()
    if labels:
        feats[FIELD_CLASS] = i64
    feats[FIELD_META] = meta
    feats["__key__"] = string
    feats["__url__"] = string
    return datasets.Features(feats)
