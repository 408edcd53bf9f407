"""Random-access training data over maskgen shards (or an image folder), with exact resume.

Why random access instead of a streaming ``webdataset`` pipeline: a resumed or distributed
run must see exactly the samples, in exactly the order and with exactly the augmentations,
that an uninterrupted single-process run sees. The samples are indexed once
(:mod:`maskio.records`: a sample is then one ``seek`` + ``read`` per field). The epoch order is a permutation
seeded by ``(seed, epoch)``, each rank takes its contiguous slice of every global batch, and
each sample's augmentation generator is seeded by ``(seed, epoch, index)``. The data
position of a run is therefore just its step count.

Nothing read from a shard is unpickled: images and masks are decoded by PIL, labels are
ASCII integers, metadata is JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from maskio.errors import ShardError, ShardFormatError
from maskio.records import FileReader, Records, read_image
from maskio.shard_format import mask_levels
from sslmask.transforms import ViewSpec, eval_view, make_view, mask_integral


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """An independent 63-bit seed per (run seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def read_mask(
    reader: FileReader, rec: Records, index: int, name: str, size: tuple[int, int]
) -> Image.Image | None:
    """Sample ``index``'s mask binarised at > 127 (None for an image-only set: all foreground)."""
    if rec.mask is None:
        return None
    try:
        mask = Image.fromarray(mask_levels(reader.read(*rec.mask[index]), f"{name}: mask"))
    except ShardFormatError as exc:
        raise ShardError(str(exc)) from None
    if mask.size != size:
        raise ShardError(f"{name}: mask {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}")
    return mask


class ViewsDataset(Dataset):
    """``(epoch, index)`` -> the views a method trains on, each with its mask and geometry.

    Per view ``v``: ``view{v}`` (uint8 image), ``mask{v}`` (uint8 soft mask; all foreground for
    an image-only set), ``box{v}`` (the crop in the source image: top, left, height, width, and
    the source's height and width) and ``flip{v}``. With ``masks=False`` (methods that ignore
    them) no ``mask{v}`` is returned, and no mask is decoded unless ``crop_masks`` asks for the
    mask-guided re-crop (``ViewSpec.min_fg``); the random draws, and so the views, are the same
    whether masks are returned or not.
    """

    def __init__(
        self,
        records: Records,
        views: Sequence[ViewSpec],
        seed: int,
        masks: bool = True,
        crop_masks: bool | None = None,
    ):
        self.records = records
        self.views = list(views)
        self.masks = masks
        crop_masks = masks if crop_masks is None else crop_masks
        # only then is the summed-area table used
        self.recrops = crop_masks and any(v.min_fg > 0 for v in self.views)
        self.seed = int(seed)
        self.reader = FileReader(records.files)

    def __len__(self) -> int:
        return len(self.records)

    def _mask(self, index: int, name: str, size: tuple[int, int]) -> Image.Image | None:
        if not (self.masks or self.recrops):
            return None
        return read_mask(self.reader, self.records, index, name, size)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = item
        rec = self.records
        name = f"{rec.files[rec.image[index, 0]]}:{rec.names[index]}"
        image = read_image(self.reader, rec, index, name)
        mask = self._mask(index, name, image.size)
        integral = mask_integral(np.asarray(mask) > 0) if mask is not None and self.recrops else None
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        out: dict[str, torch.Tensor] = {
            "index": torch.tensor(index),
            "label": torch.tensor(rec.labels[index]),
        }
        for v, spec in enumerate(self.views):
            view = make_view(g, spec, image, mask if self.masks else None, integral)
            out[f"view{v}"] = view.image
            if self.masks:
                full = torch.full((1, spec.size, spec.size), 255, dtype=torch.uint8)
                out[f"mask{v}"] = view.mask if view.mask is not None else full
            out[f"box{v}"] = torch.tensor([*view.box, image.height, image.width])
            out[f"flip{v}"] = torch.tensor(view.flipped)
        return out


class EvalDataset(Dataset):
    """Centre-cropped images and labels for feature extraction (k-NN, linear probe); with
    ``masks`` also each mask, cropped alike (uint8, all 255 for an image-only set)."""

    def __init__(self, records: Records, size: int, masks: bool = False):
        self.records = records
        self.size = int(size)
        self.masks = masks
        self.reader = FileReader(records.files)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        rec = self.records
        image = read_image(self.reader, rec, index, rec.names[index])
        out = (eval_view(image, self.size), int(rec.labels[index]))
        if not self.masks:
            return out
        mask = read_mask(self.reader, rec, index, rec.names[index], image.size)
        full = torch.full((1, self.size, self.size), 255, dtype=torch.uint8)
        return (*out, full if mask is None else eval_view(mask, self.size))


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
