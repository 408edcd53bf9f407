"""Dry-run checks of a staged folder: the card's metadata as the Hub reads it, and the shards
as ``datasets.load_dataset("webdataset", ...)`` reads them, offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from maskgen.pipeline import BuildError
from maskio.shard_format import FIELD_IMAGE, FIELD_MASK, FIELD_META, hf_features

REQUIRED_METADATA = ("license", "task_categories", "size_categories", "tags", "configs", "source_datasets")


def validate_card(path: Path) -> dict[str, Any]:
    """Parse the card with huggingface_hub's card classes; the metadata dict it reads."""
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(path)
    meta = card.data.to_dict()
    missing = [k for k in REQUIRED_METADATA if not meta.get(k)]
    if missing:
        raise BuildError(f"{path}: card metadata lacks {', '.join(missing)}")
    if meta["license"] == "other" and not (meta.get("license_name") and meta.get("license_link")):
        raise BuildError(f"{path}: license 'other' needs license_name and license_link")
    return meta


def validate_shards(folder: Path, manifest: dict[str, Any], masks_only: bool) -> dict[str, Any]:
    """Load the staged shards with the Hugging Face webdataset loader, offline; check the columns."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # a sample's method_params also say what its worker ran on (``deep``: device, dtype)
    runtime = {k: v for k, v in (manifest.get("ran_on") or [{}])[0].items() if k != "shards"}
    features = hf_features(
        {**(manifest.get("method_params") or {}), **runtime},
        image=not masks_only,
        saliency=bool(manifest.get("save_saliency")),
        labels=bool(manifest.get("class_names")),
    )
    files = sorted(str(p) for p in (folder / "data" / "train").glob("*.tar"))
    cache = folder.parent / ".publish-cache"
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": files}, split="train", features=features, cache_dir=str(cache)
    )
    expected = {FIELD_MASK, FIELD_META} | (set() if masks_only else {FIELD_IMAGE})
    missing = expected - set(ds.column_names)
    if missing:
        raise BuildError(f"{folder}: the staged shards load without {sorted(missing)}")
    if len(ds) != int(manifest["n_samples"]):
        raise BuildError(
            f"{folder}: the loader read {len(ds)} samples, the build has {manifest['n_samples']}"
        )
    first = ds[0]
    if masks_only and FIELD_IMAGE in ds.column_names:
        raise BuildError(f"{folder}: a masks-only stage still holds images")
    return {"rows": len(ds), "columns": ds.column_names, "mask_size": list(first[FIELD_MASK].size)}
