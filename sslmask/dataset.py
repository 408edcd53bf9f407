"""Random-access training data over maskgen shards (or an image folder), with exact resume.

Why random access instead of a streaming ``webdataset`` pipeline: a resumed or distributed
run must see exactly the samples, in exactly the order and with exactly the augmentations,
that an uninterrupted single-process run sees. We read each shard's tar headers once
(:func:`maskgen.shard_format.index_tar`), then a sample is one ``seek`` + ``read`` per field
(the approach of webdataset's own indexed ``wids`` reader). The epoch order is a permutation
seeded by ``(seed, epoch)``, each rank takes its contiguous slice of every global batch, and
each sample's augmentation generator is seeded by ``(seed, epoch, index)``. The data
position of a run is therefore just its step count.

Nothing read from a shard is unpickled: images and masks are decoded by PIL, labels are
ASCII integers, metadata is JSON.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from maskgen.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    ShardFormatError,
    decode_meta,
    index_tar,
)
from sslmask.data import ShardError, resolve_shards
from sslmask.transforms import ViewSpec, eval_view, make_view, mask_integral

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

    def __len__(self) -> int:
        return len(self.image)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def _label_of(read, fields: dict[str, tuple[int, int]], fid: int) -> int:
    if FIELD_CLASS in fields:
        return int(read(fid, *fields[FIELD_CLASS]).decode("ascii").strip())
    if FIELD_META in fields:
        label = decode_meta(read(fid, *fields[FIELD_META])).get("label")
        return -1 if label is None else int(label)
    return -1


def index_shards(specs: Sequence[str], require_masks: bool) -> Records:
    """Index every sample of the shards ``specs`` resolve to (see :func:`resolve_shards`)."""
    urls = resolve_shards(specs)
    reader = FileReader(urls)
    image, mask, labels, names = [], [], [], []
    for fid, url in enumerate(urls):
        try:
            samples = index_tar(url)
        except (OSError, ShardFormatError, EOFError) as exc:
            raise ShardError(f"{url}: unreadable shard ({exc})") from exc
        for key, fields in samples:
            img_field = next((f for f in IMAGE_FIELDS if f in fields), None)
            if img_field is None:
                raise ShardError(f"{url}: sample {key} has no image (built with --image-format none?)")
            if FIELD_MASK not in fields and require_masks:
                raise ShardError(f"{url}: sample {key} has no {FIELD_MASK}; this method needs masks")
            image.append((fid, *fields[img_field]))
            mask.append((fid, *fields[FIELD_MASK]) if FIELD_MASK in fields else (fid, -2, 0))
            labels.append(_label_of(reader.read, fields, fid))
            names.append(key)
    if not image:
        raise ShardError(f"{urls[0]}: the shards hold no samples")
    mask_arr = np.asarray(mask, np.int64)
    has_mask = bool((mask_arr[:, 1] != -2).all())
    return Records(
        urls, np.asarray(image, np.int64), mask_arr if has_mask else None, np.asarray(labels), names
    )


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
    return Records(files, image.astype(np.int64), None, np.asarray(labels), [Path(f).name for f in files])


def _image_folder(spec: Sequence[str]) -> Path | None:
    """The folder when ``spec`` is one folder of class folders (no maskgen build, no tars)."""
    if len(spec) == 1 and Path(spec[0]).is_dir():
        path = Path(spec[0])
        if not (path / "shards").is_dir() and not any(path.glob("*.tar")):
            return path
    return None


def index_any(spec: Sequence[str], require_masks: bool = False) -> Records:
    """Shards, or (one path to a folder of class folders without maskgen shards) an image folder."""
    folder = _image_folder(spec)
    if folder is None:
        return index_shards(spec, require_masks)
    if require_masks:
        raise ShardError(f"{folder}: an image folder has no masks; this method needs maskgen shards")
    return index_folder(folder)


def _signature(files: Sequence[str]) -> list[list]:
    """What the index depends on: each file's path, size and modification time."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def save_index(records: Records, path: Path) -> None:
    """Write the index as plain arrays (no pickle), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            signature=np.asarray([json.dumps(_signature(records.files))]),
            files=np.asarray(records.files),
            image=records.image,
            mask=records.mask if records.mask is not None else np.zeros((0, 3), np.int64),
            labels=records.labels,
            names=np.asarray(records.names),
        )
    os.replace(tmp, path)


def load_index(path: Path) -> Records | None:
    """The cached index at ``path`` if it still describes the same files, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = [str(f) for f in z["files"]]
            if json.loads(str(z["signature"][0])) != _signature(files):
                return None
            mask = z["mask"] if len(z["mask"]) else None
            return Records(files, z["image"], mask, z["labels"], [str(n) for n in z["names"]])
    except (OSError, ValueError, KeyError):
        return None


def index_cached(spec: Sequence[str], require_masks: bool, cache: Path) -> Records:
    """:func:`index_any`, reusing ``cache`` when it was made from the same, unchanged files.

    Reading every tar header (and every label) of ImageNet takes minutes; a resumed run, and
    every process of a distributed one, reads the cache instead.
    """
    records = load_index(cache) if cache.exists() else None
    if records is not None:
        wanted = None if _image_folder(spec) else resolve_shards(spec)
        if wanted is not None and [str(Path(f).resolve()) for f in wanted] == [
            str(Path(f).resolve()) for f in records.files
        ]:
            if require_masks and records.mask is None:
                raise ShardError(
                    f"{records.files[0]}: these shards have no mask.png; this method needs masks"
                )
            return records
    records = index_any(spec, require_masks)
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


def decode_rgb(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ShardError(f"{name}: cannot decode image ({exc})") from exc


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """An independent 63-bit seed per (run seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class ViewsDataset(Dataset):
    """``(epoch, index)`` -> the views a method trains on, each with its mask.

    Samples of an image-only set get an all-foreground mask (BYOL ignores it).
    """

    def __init__(self, records: Records, views: Sequence[ViewSpec], seed: int):
        self.records = records
        self.views = list(views)
        self.recrops = any(v.min_fg > 0 for v in self.views)  # only then is the summed-area table used
        self.seed = int(seed)
        self.reader = FileReader(records.files)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = item
        rec = self.records
        name = f"{rec.files[rec.image[index, 0]]}:{rec.names[index]}"
        image = decode_rgb(self.reader.read(*rec.image[index]), name)
        if rec.mask is not None:
            with Image.open(io.BytesIO(self.reader.read(*rec.mask[index]))) as im:
                mask = im.convert("L")
            if mask.size != image.size:
                raise ShardError(f"{name}: mask size {mask.size} differs from image size {image.size}")
            mask = mask.point(lambda v: 255 if v > 127 else 0)
            integral = mask_integral(np.asarray(mask) > 0) if self.recrops else None
        else:  # image-only set: no mask to resample, every view is all foreground
            mask, integral = None, None
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        out: dict[str, torch.Tensor] = {
            "index": torch.tensor(index),
            "label": torch.tensor(rec.labels[index]),
        }
        for v, spec in enumerate(self.views):
            img, m = make_view(g, spec, image, mask, integral)
            out[f"view{v}"] = img
            out[f"mask{v}"] = (
                m if m is not None else torch.full((1, spec.size, spec.size), 255, dtype=torch.uint8)
            )
        return out


class EvalDataset(Dataset):
    """Centre-cropped images and labels for feature extraction (k-NN, linear probe)."""

    def __init__(self, records: Records, size: int):
        self.records = records
        self.size = int(size)
        self.reader = FileReader(records.files)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rec = self.records
        image = decode_rgb(self.reader.read(*rec.image[index]), rec.names[index])
        return eval_view(image, self.size), int(rec.labels[index])


def epoch_order(n: int, length: int, seed: int, epoch: int) -> np.ndarray:
    """``length`` sample indices for one epoch: whole shuffled passes over ``n``, then a part."""
    passes = max(1, -(-length // n))
    parts = [np.random.default_rng([seed, epoch, rep]).permutation(n) for rep in range(passes)]
    return np.concatenate(parts)[:length]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches of one epoch, from batch ``start`` on (``drop_last``).

    Global batch ``b`` is ``order[b*B*W : (b+1)*B*W]``; rank ``r`` takes the ``r``-th block of
    ``B``, so the union over ranks is the same global batch a single process would see.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        epoch: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        samples_per_epoch: int | None = None,
        start: int = 0,
    ):
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed
        self.world_size, self.rank, self.start = world_size, rank, start
        self.steps = steps_per_epoch(n, batch_size, world_size, samples_per_epoch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        order = epoch_order(self.n, self.steps * global_batch, self.seed, self.epoch)
        for b in range(self.start, self.steps):
            lo = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, int(i)) for i in order[lo : lo + self.batch_size]]


def steps_per_epoch(n: int, batch_size: int, world_size: int, samples_per_epoch: int | None) -> int:
    return (samples_per_epoch or n) // (batch_size * world_size)
