"""Indexed shard reading, the epoch sampler (rank split, resume offset) and reproducible views."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image

from maskio.errors import ShardError, ShardFormatError
from maskio.records import index_any, index_folder, index_shards
from maskio.shard_format import index_tar, iter_tar_samples
from sslmask.dataset import EpochBatchSampler, ViewsDataset, epoch_order
from sslmask.transforms import byol_views


def _write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_index_matches_sequential_reading(sample_build):
    records = index_shards([str(sample_build)], require_masks=True)
    assert len(records) == 42 and records.mask is not None and records.labelled
    i = 0
    for fid, url in enumerate(records.files):
        for key, fields in iter_tar_samples(url):
            assert records.names[i] == key and records.image[i, 0] == fid
            with open(url, "rb") as f:
                f.seek(records.image[i, 1])
                assert f.read(records.image[i, 2]) == fields["jpg"]
                f.seek(records.mask[i, 1])
                assert f.read(records.mask[i, 2]) == fields["mask.png"]
            assert records.labels[i] == int(fields["cls"])
            i += 1


def test_image_only_shards_work_for_byol_but_not_for_mask_methods(tmp_path):
    rgb = np.full((40, 50, 3), 128, np.uint8)
    _write_tar(
        tmp_path / "plain.tar",
        {"a.jpg": jpeg_bytes(rgb), "a.cls": b"3", "b.jpg": jpeg_bytes(rgb), "b.cls": b"1"},
    )
    records = index_shards([str(tmp_path / "plain.tar")], require_masks=False)
    assert records.mask is None and list(records.labels) == [3, 1]
    item = ViewsDataset(records, byol_views(32), seed=0)[(0, 1)]
    assert item["mask0"].min() == 255  # no mask: all foreground
    with pytest.raises(ShardError, match="plain.tar: sample a has no mask.png; this method needs masks"):
        index_shards([str(tmp_path / "plain.tar")], require_masks=True)


def test_escaping_members_and_empty_shards_are_refused(tmp_path):
    _write_tar(tmp_path / "evil.tar", {"../x.jpg": b"1"})
    with pytest.raises(ShardFormatError, match="outside"):
        index_tar(tmp_path / "evil.tar")
    with pytest.raises(ShardError, match="evil.tar: unreadable shard"):
        index_shards([str(tmp_path / "evil.tar")], require_masks=False)
    _write_tar(tmp_path / "empty.tar", {})
    with pytest.raises(ShardError, match="hold no samples"):
        index_shards([str(tmp_path / "empty.tar")], require_masks=False)


def test_image_folder_layout(tmp_path):
    for cls, n in (("n02", 2), ("n01", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (20, 20)).save(tmp_path / cls / f"{i}.JPEG")
    (tmp_path / "n01" / "notes.txt").write_text("x")
    records = index_folder(tmp_path)
    assert list(records.labels) == [0, 0, 0, 1, 1] and records.mask is None
    assert len(index_any([str(tmp_path)])) == 5
    with pytest.raises(ShardError, match="image folder has no masks"):
        index_any([str(tmp_path)], require_masks=True)


def _batches(sampler):
    return [b for b in sampler]


def test_ranks_split_each_global_batch_like_one_process():
    one = _batches(EpochBatchSampler(50, 8, epoch=3, seed=7))
    r0 = _batches(EpochBatchSampler(50, 4, epoch=3, seed=7, world_size=2, rank=0))
    r1 = _batches(EpochBatchSampler(50, 4, epoch=3, seed=7, world_size=2, rank=1))
    assert len(one) == len(r0) == len(r1) == 6
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    flat = [i for b in one for _, i in b]
    assert len(set(flat)) == 48 and all(e == 3 for b in one for e, _ in b)


def test_resume_offset_and_epoch_sizing():
    full = _batches(EpochBatchSampler(50, 8, epoch=0, seed=1))
    assert _batches(EpochBatchSampler(50, 8, epoch=0, seed=1, start=4)) == full[4:]
    assert _batches(EpochBatchSampler(50, 8, epoch=1, seed=1)) != full
    order = epoch_order(10, 25, seed=0, epoch=0)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert len(EpochBatchSampler(10, 4, epoch=0, seed=0, samples_per_epoch=25)) == 6


def test_views_depend_only_on_seed_epoch_and_index(sample_build):
    records = index_shards([str(sample_build)], require_masks=True)
    ds = ViewsDataset(records, byol_views(48), seed=0)
    a, b = ds[(2, 5)], ViewsDataset(records, byol_views(48), seed=0)[(2, 5)]
    for k in ("view0", "mask0", "view1", "mask1"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["view0"], ds[(3, 5)]["view0"])
    assert a["label"] == records.labels[5] and a["mask0"].shape == (1, 48, 48)


def test_index_cache_is_reused_until_a_shard_changes(sample_build, tmp_path, monkeypatch):
    import os

    import maskio.records as dataset

    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sorted((sample_build / "shards").glob("*.tar")):
        (shards / p.name).write_bytes(p.read_bytes())
    spec, cache = [str(shards / "*.tar")], tmp_path / "run" / "shard-index.npz"
    first = dataset.index_cached(spec, True, cache)
    assert cache.exists()

    def boom(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dataset, "index_tar", boom)
    again = dataset.index_cached(spec, True, cache)
    assert again.files == first.files and again.names == first.names
    assert np.array_equal(again.image, first.image) and np.array_equal(again.labels, first.labels)
    # a rewritten shard invalidates the cache
    target = shards / "maskgen-000001.tar"
    os.utime(target, ns=(0, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cache should have been used"):
        dataset.index_cached(spec, True, cache)


def test_eval_dataset_crops_each_mask_with_its_image(sample_build, tmp_path):
    from sslmask.dataset import EvalDataset

    records = index_any([str(sample_build)], require_masks=True)
    ds = EvalDataset(records, 32, masks=True)
    image, label, mask = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and mask.dtype == torch.uint8
    # the mask's centre crop: the same resize and crop as the image, of the binarised mask
    from maskio.records import FileReader

    with Image.open(io.BytesIO(FileReader(records.files).read(*records.mask[0]))) as im:
        binary = im.convert("L").point(lambda v: 255 if v > 127 else 0)
    w, h = binary.size
    short = round(32 / 0.875)
    s = short / min(w, h)
    nw, nh = max(32, round(w * s)), max(32, round(h * s))
    left, top = (nw - 32) // 2, (nh - 32) // 2
    crop = binary.resize((nw, nh), Image.BILINEAR).crop((left, top, left + 32, top + 32))
    assert np.array_equal(mask[0].numpy(), np.asarray(crop))
    assert torch.equal(image, EvalDataset(records, 32)[0][0]) and len(EvalDataset(records, 32)[0]) == 2
    # an image-only set: all foreground
    folder = tmp_path / "imgs"
    (folder / "cls").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(folder / "cls" / "a.png")
    plain = EvalDataset(index_any([str(folder)]), 16, masks=True)[0]
    assert torch.equal(plain[2], torch.full((1, 16, 16), 255, dtype=torch.uint8))


def test_a_mask_free_twin_gets_the_mask_aware_methods_crops(sample_build):
    """Issue 41 item 1: BYOL given ``data.min_fg`` reads masks only to place its crops, and then
    sees exactly HARL's views (same seed); without it the re-crop moves some crops."""
    records = index_shards([str(sample_build)], require_masks=True)
    views = byol_views(48, min_fg=0.6)
    harl = ViewsDataset(records, views, seed=0, masks=True)
    twin = ViewsDataset(records, views, seed=0, masks=False, crop_masks=True)
    plain = ViewsDataset(records, views, seed=0, masks=False)
    moved = 0
    for i in range(len(records)):
        a, b, c = harl[(1, i)], twin[(1, i)], plain[(1, i)]
        assert "mask0" in a and "mask0" not in b and "mask0" not in c
        for k in ("view0", "view1", "box0", "box1", "flip0", "flip1"):
            assert torch.equal(a[k], b[k]), (i, k)
        moved += not torch.equal(a["box0"], c["box0"])
    assert moved > 0


def test_which_runs_read_masks():
    from sslmask.config import load_settings
    from sslmask.methods import METHODS

    byol, harl = load_settings("byol"), load_settings("harl")
    assert harl.data.min_fg == 0.0  # the paper's plain random crops; the re-crop is opt-in
    assert not METHODS["byol"].reads_masks(byol) and METHODS["harl"].reads_masks(harl)
    byol = byol.replace("data", min_fg=0.2)
    assert METHODS["byol"].reads_masks(byol) and not METHODS["byol"].uses_masks(byol)
