"""Training crops for ``maskgen deep fit``: an image and its teacher mask, augmented together.

torchvision's v2 transforms move an ``Image`` and its ``Mask`` with one geometry (the mask
resized nearest-neighbour, so it stays binary) and jitter the colours of the image only.
Each sample's randomness is seeded by ``(seed, epoch, index)`` in a forked RNG, so a fit gives
the same crops whatever the number of DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskio.errors import ShardError
from maskio.records import FileReader, Records, read_image
from maskio.shard_format import decode_mask_png


def crop_transform(size: int, min_scale: float = 0.3) -> v2.Compose:
    """Random resized crop and flip (image and mask), colour jitter and grey (image only)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])  # fmt: skip


class TeacherCrops(Dataset):
    """``(epoch, index)`` -> ``(uint8 3xSxS image, float 1xSxS mask in {0, 1})``."""

    def __init__(self, records: Records, size: int, seed: int):
        if records.mask is None:
            raise ShardError(f"{records.files[0]}: these shards have no masks to learn from")
        self.records = records
        self.reader = FileReader(records.files)
        self.transform = crop_transform(size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Image.Image:
        rec = self.records
        return read_image(self.reader, rec, index, f"{rec.files[rec.image[index, 0]]}:{rec.names[index]}")

    def mask(self, index: int) -> np.ndarray:
        """The teacher's mask as a bool array."""
        rec = self.records
        assert rec.mask is not None
        name = f"{rec.files[rec.mask[index, 0]]}:{rec.names[index]}: mask"
        return decode_mask_png(self.reader.read(*rec.mask[index]), name)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item
        image = tv_tensors.Image(np.asarray(self.image(index)).transpose(2, 0, 1).copy())
        mask = tv_tensors.Mask(torch.from_numpy(self.mask(index))[None].to(torch.uint8))
        if mask.shape[-2:] != image.shape[-2:]:
            rec = self.records
            raise ShardError(f"{rec.files[rec.mask[index, 0]]}:{rec.names[index]}: mask "
                             f"{mask.shape[-1]}x{mask.shape[-2]}, its image {image.shape[-1]}x{image.shape[-2]}")  # fmt: skip
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()
