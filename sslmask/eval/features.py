"""Features for evaluation: a checkpoint's trunk (or a whole run's query embedding) on labelled
splits. The extractor itself is ``sslmask.features``, below the methods."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from maskio.records import Records
from sslmask.features import TRUNK_EMBEDDINGS, extract_features, trunk_embedding
from sslmask.methods.base import SSLMethod


def labelled_features(
    checkpoint: str,
    arch: str | None,
    train_spec,
    val_spec,
    image_size: int,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    branch: str = "auto",
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], str | None]:
    """``((train_feats, train_labels, val_feats, val_labels), scored branch)`` from one frozen
    backbone.

    ``checkpoint`` is anything :func:`sslmask.checkpoint.load_backbone` takes and ``branch``
    which of a run's trunks (``auto``: the method's protocol); ``seed`` makes the ``random``
    baseline reproducible. Both sets must be labelled.
    """
    from sslmask.checkpoint import load_backbone_branch

    train, val = labelled_splits(train_spec, val_spec)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, scored = load_backbone_branch(checkpoint, arch, branch=branch)
    backbone = backbone.to(device)
    out: list[torch.Tensor] = []
    for records in (train, val):
        out.extend(extract_features(backbone, records, image_size, batch_size, workers, device))
    return (out[0], out[1], out[2], out[3]), scored


def labelled_splits(train_spec: Sequence[str], val_spec: Sequence[str]) -> tuple[Records, Records]:
    """``(train, val)`` records, both labelled, val's labels matched to train's classes by
    name (``maskio.records.align_labels``)."""
    from maskio.errors import ShardError
    from maskio.records import align_labels, index_any

    splits = []
    for spec in (train_spec, val_spec):
        records = index_any(spec)
        if not records.labelled:
            raise ShardError(f"{spec[0]}: some samples have no class label; evaluation needs labels")
        splits.append(records)
    return splits[0], align_labels(splits[0], splits[1], str(val_spec[0]))


FEATURE_KINDS = (*TRUNK_EMBEDDINGS, "predictor")


def load_run_method(spec: str) -> SSLMethod:
    """The whole trained method of an sslmask run (folder or checkpoint.pt), in eval mode."""
    from pathlib import Path

    from sslmask.checkpoint import CheckpointError, load_file, run_checkpoint_path
    from sslmask.config import ConfigError, saved_settings
    from sslmask.methods import build_method

    path = Path(spec)
    if spec == "random" or not path.exists():
        raise CheckpointError(f"{spec}: --features predictor needs an sslmask run (folder or checkpoint.pt)")
    obj = load_file(run_checkpoint_path(path) if path.is_dir() else path)
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict) or "method" not in obj:
        raise CheckpointError(f"{spec}: --features predictor needs an sslmask run (folder or checkpoint.pt)")
    try:
        method = build_method(saved_settings(obj["config"]))
        method.load_state_dict(obj["method"])
    except (ConfigError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{spec}: cannot rebuild its method ({str(exc).splitlines()[0]})") from None
    return method.eval()


def embedder(checkpoint: str, arch: str | None, kind: str, branch: str = "auto"):
    """``(module, embed, scored branch)``: what features a split gets. ``backbone``: the pooled
    feature (ResNet GAP, ViT CLS) of ``branch``; ``gap``: the mean of its feature grid (a ViT's
    patch tokens); ``predictor``: a run's query embedding (``SSLMethod.embed``: MoCo v3's
    predictor(projector(CLS)), LoDisc's predictor(CLS) with its code heads), the feature LoDisc
    retrieves with, always from the online branch."""
    from sslmask.checkpoint import CheckpointError, canonical_branch, load_backbone_branch

    if kind not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if kind in TRUNK_EMBEDDINGS:
        backbone, scored = load_backbone_branch(checkpoint, arch, branch=branch)
        return backbone, trunk_embedding(backbone, kind), scored
    if canonical_branch(branch) not in ("auto", "online"):
        raise CheckpointError(f"--features {kind}: the {kind} is the online branch's, not {branch}'s")
    method = load_run_method(checkpoint)
    if kind not in method.embeddings:
        raise CheckpointError(f"{checkpoint}: a {method.name} run has no {kind}; use --features backbone")
    return method, partial(method.embed, kind=kind), "online"


def split_features(checkpoint: str, arch: str | None, spec, image_size: int, kind: str = "backbone",
                   batch_size: int = 128, workers: int = 2,
                   branch: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str | None]:  # fmt: skip
    """Features, labels and the scored branch of one labelled split (shards or class folders)."""
    from maskio.errors import ShardError
    from maskio.records import index_any

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module, embed, scored = embedder(checkpoint, arch, kind, branch)
    records = index_any(spec)
    if not records.labelled:
        raise ShardError(f"{spec[0]}: some samples have no class label; evaluation needs labels")
    feats, labels = extract_features(
        module.to(device), records, image_size, batch_size, workers, device, embed
    )
    return feats, labels, scored
