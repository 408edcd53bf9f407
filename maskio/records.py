"""Where each training or evaluation sample's bytes are: maskgen shards or a class-folder tree.

Reading every tar header (and label) of a large build takes minutes, so the result is a small
array table (:class:`Records`) that can be cached and read back without pickle. A sample is
then one ``seek`` + ``read`` per field (the approach of webdataset's own indexed ``wids``
reader). Nothing read here is unpickled: labels are ASCII integers and metadata is JSON.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from maskio.atomic import atomic_open
from maskio.errors import ShardError, ShardFormatError
from maskio.hub import download_snapshot, is_hub_spec, published_manifest, snapshot_tars
from maskio.metadata import read_manifest
from maskio.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    MANIFEST,
    build_root,
    decode_class,
    decode_meta,
    in_sample,
    index_tar,
    open_limited,
    shard_paths,
)


def resolve_shards(specs: Sequence[str]) -> list[str]:
    """Expand build folders, shard folders, globs and brace patterns into tar paths.

    ``OUT`` (a maskgen build) and ``OUT/shards`` give the complete shards of that build;
    ``data/maskgen-{000000..000009}.tar`` and ``data/*.tar`` work as in webdataset; a published
    dataset works as ``hf://datasets/OWNER/NAME[@REVISION]`` or as its downloaded snapshot
    folder (``maskio.hub``).
    """
    import braceexpand

    urls: list[str] = []
    for spec in specs:
        if is_hub_spec(spec):
            urls.extend(str(p) for p in snapshot_tars(download_snapshot(spec)))
            continue
        path = Path(spec)
        if path.is_dir() and snapshot_tars(path):
            urls.extend(str(p) for p in snapshot_tars(path))
            continue
        if path.is_dir():
            build_dir = build_root(path)
            found = [str(p) for p in shard_paths(build_dir)]
            if not found:
                raise ShardError(f"{spec}: no complete maskgen shards in this folder")
            _refuse_incomplete(spec, build_dir, len(found))
            urls.extend(found)
            continue
        expanded = []
        if brace_count(spec) > MAX_PATTERN_SHARDS:  # braceexpand builds {0..99999999} before yielding
            raise ShardError(f"{spec}: expands to more than {MAX_PATTERN_SHARDS:,} shard names")
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            expanded.extend(matches)
        missing = [u for u in expanded if not Path(u).is_file()]
        if not expanded or missing:
            raise ShardError(f"{spec}: no such shard{'' if not missing else ' ' + missing[0]}")
        urls.extend(expanded)
    if not urls:
        raise ShardError("no shards given")
    return urls


def _refuse_incomplete(spec: str, build_dir: Path, n_found: int) -> None:
    """A build folder whose manifest says the build has not finished (still running, killed,
    or with failed shards) is not read as if it were the whole set; its shard files can be."""
    if not (build_dir / MANIFEST).is_file():
        return  # shards without a manifest: a folder of shards, taken as it is
    manifest = read_manifest(build_dir / MANIFEST)
    if manifest.get("complete") is False:
        total = manifest.get("n_shards", "?")
        raise ShardError(f"{spec}: the build is not complete ({n_found} of {total} shards); re-run maskgen "
                         f"build to finish it, or name its shards ({build_dir}/shards/*.tar) to read those")  # fmt: skip


MAX_PATTERN_SHARDS = 100_000  # ImageNet-21k in 1,000-image shards is 14,197
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([a-zA-Z])\.\.([a-zA-Z])")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside any braces."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "{") - (c == "}")
        if c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def brace_count(pattern: str) -> int:
    """How many names a brace pattern expands to, counted from its text (no expansion): a
    product over its groups of each range's length or each list's summed alternatives."""
    total, i = 1, 0
    while i < len(pattern):
        if pattern[i] != "{":
            i += 1
            continue
        depth, j = 0, i
        while j < len(pattern):
            depth += (pattern[j] == "{") - (pattern[j] == "}")
            if depth == 0:
                break
            j += 1
        if j == len(pattern):  # an unclosed brace is literal
            return total
        inner = pattern[i + 1 : j]
        m = _RANGE.fullmatch(inner)
        if m and m.group(1) is not None:
            step = abs(int(m.group(3) or 1)) or 1
            total *= abs(int(m.group(2)) - int(m.group(1))) // step + 1
        elif m:
            total *= abs(ord(m.group(5)) - ord(m.group(4))) + 1
        elif "," in inner:
            total *= sum(brace_count(alt) for alt in _split_top(inner))
        i = j + 1
    return total


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# image payload names accepted in shards besides maskgen's "jpg"
IMAGE_FIELDS = (FIELD_IMAGE, "jpeg", "png", "webp")


@dataclass
class Records:
    """Where each sample's bytes are: a tar slice ``(file, offset, size)`` or a whole file."""

    files: list[str]
    image: np.ndarray  # (n, 3) int64: file id, offset, size (offset -1 = whole file)
    mask: np.ndarray | None  # same layout, None when the set has no masks
    labels: np.ndarray  # (n,) int64, -1 = unlabelled
    names: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # label -> class name, when the source names its classes
    # masks-only shards joined to the images they were built from (``index_shards(images=)``):
    # the image folder, and per sample the sha256 its build recorded ('' = not recorded, or
    # the sample's image is in its shard)
    image_root: str | None = None
    image_sha256: np.ndarray | None = None  # (n,) S64: ASCII hex digests, compact for ImageNet's 1.28 M

    def __len__(self) -> int:
        return len(self.image)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Records:
        """The records at ``indices``, in that order (same files)."""
        idx = np.asarray(indices, np.int64)
        mask = self.mask[idx] if self.mask is not None else None
        names = [self.names[i] for i in idx] if self.names else []
        shas = self.image_sha256[idx] if self.image_sha256 is not None else None
        return replace(self, image=self.image[idx], mask=mask, labels=self.labels[idx], names=names,
                       image_sha256=shas)  # fmt: skip

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def _label_of(read, fields: dict[str, tuple[int, int]], fid: int, meta: dict) -> int:
    """The sample's ``cls``, else its (already decoded and checked) json's label, else -1."""
    if FIELD_CLASS in fields:
        return decode_class(read(fid, *fields[FIELD_CLASS]))
    label = meta.get("label")
    return -1 if label is None else label


def shard_error(url: str, exc: BaseException) -> ShardError:
    """One line naming the shard: ``exc``'s own when it already starts with the path."""
    text = str(exc)
    return ShardError(text if text.startswith(f"{url}:") else f"{url}: unreadable shard ({text})")


def index_shards(specs: Sequence[str], require_masks: bool, images: str | Path | None = None) -> Records:
    """Index every sample of the shards ``specs`` resolve to (see :func:`resolve_shards`).

    ``images``: the folder a masks-only build read (``--image-format none``, or a published
    masks-only dataset). Each sample without an image is joined to ``images / json.path``; the
    file must exist there, and when it is read it must have the sha256 its build recorded.
    Samples that carry their own image keep it (a note says so).
    """
    urls = resolve_shards(specs)
    root = _image_root(images)
    reader = FileReader(urls)
    files = list(urls)
    image, mask, labels, names, shas = [], [], [], [], []
    own = 0
    for fid, url in enumerate(urls):
        try:
            samples = index_tar(url)
        except (OSError, ShardFormatError, EOFError) as exc:
            raise shard_error(url, exc) from None
        for key, fields in samples:
            # every sample's json is read and checked here, once per index (the index is cached):
            # a malformed one is refused by train and every eval as by inspect and maskgen eval
            with in_sample(url, key):
                meta = decode_meta(reader.read(fid, *fields[FIELD_META])) if FIELD_META in fields else {}
            img_field = next((f for f in IMAGE_FIELDS if f in fields), None)
            if img_field is not None:
                own += 1
                image.append((fid, *fields[img_field]))
                shas.append("")
            elif root is None:
                raise ShardError(f"{url}: sample {key} has no image (a masks-only build); give the "
                                 "folder it was built from with --images ROOT")  # fmt: skip
            else:
                image.append((len(files), -1, 0))
                files.append(str(_joined_file(root, meta.get("path"), url, key)))
                shas.append(meta.get("source_sha256") or "")
            if FIELD_MASK not in fields and require_masks:
                raise ShardError(f"{url}: sample {key} has no {FIELD_MASK}; this method needs masks")
            mask.append((fid, *fields[FIELD_MASK]) if FIELD_MASK in fields else (fid, -2, 0))
            with in_sample(url, key):
                labels.append(_label_of(reader.read, fields, fid, meta))
            names.append(key)
    if not image:
        raise ShardError(f"{urls[0]}: the shards hold no samples")
    if root is not None and own:
        print(f"note: {own} of {len(image)} samples carry their own image in the shard; those bytes are "
              f"used for them, not {root}", file=sys.stderr)  # fmt: skip
    mask_arr = np.asarray(mask, np.int64)
    has_mask = bool((mask_arr[:, 1] != -2).all())
    joined = root is not None and own < len(image)
    return Records(
        files,
        np.asarray(image, np.int64),
        mask_arr if has_mask else None,
        np.asarray(labels),
        names,
        build_class_names(urls),
        str(root) if joined else None,
        np.asarray(shas, dtype="S64") if joined else None,
    )


def _image_root(images: str | Path | None) -> Path | None:
    if images is None:
        return None
    root = Path(images).expanduser()
    if not root.is_dir():
        raise ShardError(f"--images {images}: no such folder")
    return root.resolve()


def _joined_file(root: Path, rel: object, url: str, key: str) -> Path:
    """``root / rel`` for a masks-only sample, refusing a path that is missing, absolute or
    climbs out of ``root`` (a shard names files; it may not name any file on the machine)."""
    if not isinstance(rel, str) or not rel:
        raise ShardError(f"{url}: sample {key}: no json.path to find its image under {root}")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise ShardError(f"{url}: sample {key}: json.path {rel!r} leaves the image folder")
    path = root.joinpath(*parts)
    if not path.is_file():
        raise ShardError(f"{url}: sample {key}: image {rel} not found under {root}")
    return path


def build_class_names(urls: Sequence[str]) -> list[str] | None:
    """The class names the builds of ``urls`` recorded (``manifest.json``'s ``class_names``,
    label i = name i), when every shard comes from a build that recorded the same list."""
    found: list[list[str] | None] = []
    for root in {Path(u).absolute().parent.parent for u in urls}:
        if (root / MANIFEST).is_file():
            names = read_manifest(root / MANIFEST).get("class_names")
        else:  # a published snapshot: data/train/x.tar
            names = (published_manifest(root.parent) or {}).get("class_names")
        found.append(names)
    if not found or any(f is None or f != found[0] for f in found):
        return None
    return found[0]


def align_labels(train: Records, val: Records, val_spec: str = "--val") -> Records:
    """``val`` with its labels in ``train``'s label space, matched by class name.

    Two builds (or class-folder trees) number their classes each by its own sorted names, so
    a validation split with other classes than the training split would be scored against the
    wrong classes. When both sides name their classes, val's labels are mapped by name and a
    val class the training split lacks is refused; when either side does not, the labels are
    taken as they are (the builds must then share one numbering).
    """
    if train.classes is None or val.classes is None or train.classes == val.classes:
        return val
    if len(set(train.classes)) < len(train.classes) or len(set(val.classes)) < len(val.classes):
        return val  # a name used twice cannot say which label it is: keep the builds' numbering
    index = {name: i for i, name in enumerate(train.classes)}
    used = sorted({int(label) for label in val.labels if label >= 0})
    unknown = [val.classes[i] for i in used if i < len(val.classes) and val.classes[i] not in index]
    if unknown or any(i >= len(val.classes) for i in used):
        missing = unknown[0] if unknown else f"label {used[-1]}"
        raise ShardError(f"{val_spec}: class {missing!r} is not among the training split's classes")
    mapping = np.asarray([index[name] for name in val.classes], np.int64)
    labels = np.where(val.labels >= 0, mapping[np.clip(val.labels, 0, None)], val.labels)
    return replace(val, labels=labels, classes=train.classes)


def index_folder(root: str | Path) -> Records:
    """An ImageNet-layout folder ``root/<class>/*.jpg``; label = rank of the class folder name."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = []
    labels = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                files.append(str(p))
                labels.append(label)
    if not files:
        raise ShardError(f"{root}: no images in class sub-folders")
    image = np.stack([np.arange(len(files)), np.full(len(files), -1), np.zeros(len(files))], 1)
    names = [Path(f).name for f in files]
    return Records(files, image.astype(np.int64), None, np.asarray(labels), names, classes)


def _image_folder(spec: Sequence[str]) -> Path | None:
    """The folder when ``spec`` is one folder of class folders (no maskgen build, no tars)."""
    if len(spec) == 1 and Path(spec[0]).is_dir():
        path = Path(spec[0])
        if not (path / "shards").is_dir() and not any(path.glob("*.tar")) and not snapshot_tars(path):
            return path
    return None


@dataclass(frozen=True)
class DataSpec(Sequence):
    """One split as a command names it: its shard specs (or one class-folder tree), and the
    image folder its masks-only shards are joined to (``--images``). Reads as the spec list."""

    paths: tuple[str, ...]
    images: str | None = None

    def __getitem__(self, i):
        return self.paths[i]

    def __len__(self) -> int:
        return len(self.paths)


def index_any(
    spec: Sequence[str] | DataSpec, require_masks: bool = False, images: str | Path | None = None
) -> Records:
    """Shards, or (one path to a folder of class folders without maskgen shards) an image folder.
    ``images`` (or a :class:`DataSpec`'s): the folder masks-only shards are joined to."""
    if isinstance(spec, DataSpec):
        spec, images = list(spec.paths), images or spec.images
    folder = _image_folder(spec)
    if folder is None:
        return index_shards(spec, require_masks, images)
    if images is not None:
        raise ShardError(f"{folder}: an image folder holds its images; --images is for masks-only shards")
    if require_masks:
        raise ShardError(f"{folder}: an image folder has no masks; this method needs maskgen shards")
    return index_folder(folder)


def _signature(files: Sequence[str], image_root: str | None = None) -> list[list]:
    """What the index depends on: each file's path, size and modification time. Images joined
    from ``image_root`` are left out (a million stat calls; each read checks its hash instead)."""
    out = []
    skip = None if image_root is None else os.path.join(image_root, "")
    for f in files:
        if skip is not None and f.startswith(skip):
            continue
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def save_index(records: Records, path: Path) -> None:
    """Write the index as plain arrays (no pickle), atomically."""
    with atomic_open(path, "wb") as f:
        np.savez(
            f,
            signature=np.asarray([json.dumps(_signature(records.files, records.image_root))]),
            files=np.asarray(records.files),
            image=records.image,
            mask=records.mask if records.mask is not None else np.zeros((0, 3), np.int64),
            labels=records.labels,
            names=np.asarray(records.names),
            image_root=np.asarray([records.image_root or ""]),
            image_sha256=records.image_sha256 if records.image_sha256 is not None else np.zeros(0, "S64"),
        )


def load_index(path: Path) -> Records | None:
    """The cached index at ``path`` if it still describes the same files, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = [str(f) for f in z["files"]]
            root = str(z["image_root"][0]) if "image_root" in z.files else ""
            if json.loads(str(z["signature"][0])) != _signature(files, root or None):
                return None
            mask = z["mask"] if len(z["mask"]) else None
            shas = z["image_sha256"] if root else None
            return Records(files, z["image"], mask, z["labels"], [str(n) for n in z["names"]],
                           image_root=root or None, image_sha256=shas)  # fmt: skip
    except (OSError, ValueError, KeyError):
        return None


def index_cached(
    spec: Sequence[str], require_masks: bool, cache: Path, images: str | Path | None = None
) -> Records:
    """:func:`index_any`, reusing ``cache`` when it was made from the same, unchanged files.

    Reading every tar header (and every label) of ImageNet takes minutes; a resumed run, and
    every process of a distributed one, reads the cache instead.
    """
    # shards are resolved once (an hf:// spec is a download, or at least a question to the Hub)
    wanted = None if _image_folder(spec) else resolve_shards(spec)
    records = load_index(cache) if cache.exists() and wanted is not None else None
    root = _image_root(images)
    if records is not None and wanted is not None:
        shard_files = records.files[: len(wanted)]
        same_root = records.image_root == (str(root) if root is not None else None)
        if same_root and [str(Path(f).resolve()) for f in wanted] == [
            str(Path(f).resolve()) for f in shard_files
        ]:
            if require_masks and records.mask is None:
                raise ShardError(
                    f"{records.files[0]}: these shards have no mask.png; this method needs masks"
                )
            return records
    records = (
        index_any(spec, require_masks, images)
        if wanted is None
        else index_shards(wanted, require_masks, images)
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_index(records, cache)
    return records


class FileReader:
    """Opens files lazily, once per process (DataLoader workers inherit no open handles)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        self._pid = -1
        self._handles: dict[int, io.BufferedReader] = {}

    def read(self, fid: int, offset: int, size: int) -> bytes:
        if offset == -1:
            with open(self.files[fid], "rb") as f:
                return f.read()
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(fid)
        if handle is None:
            handle = self._handles[fid] = open(self.files[fid], "rb")  # noqa: SIM115 (kept open)
        handle.seek(offset)
        return handle.read(size)


def read_image(reader: FileReader, records: Records, index: int, name: str) -> Image.Image:
    """Sample ``index``'s image as RGB. An image joined from an image folder must have the
    sha256 its build recorded (so another copy of the dataset cannot pair other pixels with
    the masks) and is turned upright by its EXIF orientation, as the build turned it."""
    fid, offset, size = (int(v) for v in records.image[index])
    data = reader.read(fid, offset, size)
    joined = records.image_root is not None and offset == -1
    want = records.image_sha256[index] if joined and records.image_sha256 is not None else b""
    if want and hashlib.sha256(data).hexdigest().encode() != want:
        raise ShardError(
            f"sample {records.names[index]}: {records.files[fid]} is not the image its mask was built "
            f"from (sha256 differs from the build's); is {records.image_root} the folder the build read?"
        )
    return decode_rgb(data, name, upright=joined)


def decode_rgb(data: bytes, name: str, upright: bool = False) -> Image.Image:
    """RGB pixels of ``data``; with ``upright``, turned by its EXIF orientation (as builds store
    images: a build's own images are already upright)."""
    try:
        with open_limited(data, name) as im:
            return (ImageOps.exif_transpose(im) if upright else im).convert("RGB")
    except ShardFormatError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ShardError(f"{name}: cannot decode image ({exc})") from exc
