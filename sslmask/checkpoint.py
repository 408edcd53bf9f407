"""Checkpoints: atomic writes, safe loads (``weights_only=True``), backbone extraction.

Backbones load from sslmask runs and exports, torchvision, MoCo v2/v3, DINO, BYOL/solo-learn
and safetensors files (see ``backbone_state``). A run directory holds ``checkpoint.pt``: ``{"method": state_dict, "optimizer": ...,
"scaler": ..., "step": int, "config": dict, "rng": {...}}``. ``sslmask export`` writes the
online backbone alone, with torchvision's parameter names.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from maskio.atomic import atomic_open
from maskio.errors import CheckpointError
from sslmask.backbones import ARCHS, Backbone, build_backbone

__all__ = [
    "CheckpointError",
    "backbone_state",
    "infer_arch",
    "init_backbone",
    "load_backbone",
    "load_file",
    "save_atomic",
]

CHECKPOINT = "checkpoint.pt"
BACKBONE_PREFIX = "backbone."


def save_atomic(
    obj: Any, path: str | Path, metadata: dict[str, str] | None = None, safetensors: bool | None = None
) -> None:
    """Write ``obj`` with :func:`maskio.atomic.atomic_open` (a crash never leaves a partial file).

    Safetensors (``safetensors=True``, or by default for ``.safetensors`` paths) takes a dict
    of tensors and optional string ``metadata``; otherwise ``torch.save`` writes ``obj``.
    """
    path = Path(path)
    if safetensors is None:
        safetensors = path.suffix == ".safetensors"
    with atomic_open(path, "wb") as f:
        if safetensors:
            from safetensors.torch import save

            f.write(save(obj, metadata=metadata))
        else:  # serialised in memory first: torch.save on a full disk fails with an opaque
            buffer = io.BytesIO()  # RuntimeError, a plain write with OSError(ENOSPC)
            torch.save(obj, buffer)
            f.write(buffer.getbuffer())


def load_file(path: str | Path) -> Any:
    """A checkpoint's contents: safetensors, or torch.save output with ``weights_only=True``."""
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: no such checkpoint") from exc
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a loadable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # unpickling refused, truncated file, not a torch file
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from exc


def run_checkpoint_path(run: str | Path) -> Path:
    return Path(run) / CHECKPOINT


# Where the ResNet trunk sits in the checkpoints of common self-supervised codebases, in the
# order they are tried: MoCo v2 (encoder_q), MoCo v3 (base_encoder), DINO / BYOL / solo-learn /
# sslmask (backbone), DDP-wrapped torchvision, plain torchvision.
TRUNK_PREFIXES = (
    "module.encoder_q.",
    "encoder_q.",
    "module.base_encoder.",
    "base_encoder.",
    "module.backbone.",
    BACKBONE_PREFIX,
    "module.",
    "",
)
HEAD_PREFIXES = ("fc.", "head.")  # classifier / projection heads that live inside the trunk's namespace


def backbone_state(obj: Any, branch: str = "teacher") -> dict[str, torch.Tensor]:
    """The trunk's tensors (ResNet: torchvision-named; ViT: timm-named), from the checkpoint formats in use.

    Accepts an sslmask run checkpoint (the online backbone), DINO's ``{"teacher", "student"}``
    (``branch`` picks one; DINO evaluates the teacher), ``{"state_dict": ...}`` /
    ``{"model": ...}`` wrappers (MoCo, solo-learn, torchvision references), and flat state
    dicts, with the prefixes in ``TRUNK_PREFIXES``. Projection heads and ``fc`` are dropped.
    """
    if isinstance(obj, dict) and isinstance(obj.get("method"), dict):
        obj = {k: v for k, v in obj["method"].items() if not k.endswith("_extra_state")}  # SegAS's clusters
    if isinstance(obj, dict) and isinstance(obj.get(branch), dict):
        obj = obj[branch]
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state_dict of tensors")
    prefix = next((p for p in TRUNK_PREFIXES if f"{p}conv1.weight" in obj or f"{p}cls_token" in obj), None)
    if prefix is None:
        raise CheckpointError(
            "no ResNet or ViT trunk found (no conv1.weight or cls_token under "
            f"{', '.join(repr(p) for p in TRUNK_PREFIXES[:-1])})"
        )
    out = {}
    for k, v in obj.items():
        if k.startswith(prefix):
            name = k[len(prefix) :]
            if not name.startswith(HEAD_PREFIXES):
                out[name] = v
    return out


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """``(arch, out_stride)`` of a torchvision-named ResNet or timm-named ViT state_dict, from its shapes."""
    if "cls_token" in state:
        from sslmask.vit import VIT_ARCHS

        width = int(state["cls_token"].shape[-1])
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        for name, (dim, layers, _) in VIT_ARCHS.items():
            if (dim, layers) == (width, depth):
                return name, 16
        raise CheckpointError(f"ViT with width {width} and {depth} blocks matches no known arch")
    blocks = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    width = int(state["conv1.weight"].shape[0]) if "conv1.weight" in state else -1
    bottleneck = "layer1.0.conv3.weight" in state
    for name, (block, layers, widths) in ARCHS.items():
        if layers == blocks and widths[0] == width and (block.__name__ == "Bottleneck") == bottleneck:
            return name, 32
    raise CheckpointError(f"backbone with blocks {blocks}, width {width} matches no known arch")


def load_backbone(spec: str, arch: str | None = None, out_stride: int | None = None) -> Backbone:
    """A backbone from a run folder, a checkpoint/state_dict file, or ``random`` (with ``arch``)."""
    if spec == "random":
        if not arch:
            raise CheckpointError("--checkpoint random needs --arch")
        return build_backbone(arch, out_stride or 32)
    obj, state = _read_trunk(spec)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        model_cfg = obj["config"]["model"]
        arch = arch or model_cfg["arch"]
        out_stride = out_stride or model_cfg["out_stride"]
    if arch is None:
        arch, _ = infer_arch(state)
    try:
        backbone = build_backbone(arch, out_stride or 32)
    except ValueError as exc:  # an unknown arch or stride (from --arch or the run's config)
        raise CheckpointError(f"{spec}: {exc}") from None
    _fill(backbone, state, spec, arch)
    return backbone


def init_backbone(backbone: torch.nn.Module, spec: str, arch: str) -> None:
    """Start ``backbone`` (an ``arch``) from the trunk of checkpoint ``spec`` (``model.init``).

    ``spec`` is anything ``load_backbone`` reads: a run folder, an export, a torchvision, timm,
    DINO or MoCo checkpoint. Every tensor must fit; BatchNorm statistics come along.
    """
    _, state = _read_trunk(spec)
    _fill(backbone, state, spec, arch)


def _read_trunk(spec: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """The checkpoint object at ``spec`` (a file or a run folder) and its trunk's tensors."""
    path = Path(spec)
    obj = load_file(run_checkpoint_path(path) if path.is_dir() else path)
    try:
        return obj, backbone_state(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{spec}: {exc}") from None


def _fill(backbone: torch.nn.Module, state: dict[str, torch.Tensor], spec: str, arch: str) -> None:
    """Copy ``state`` into ``backbone``, or one line saying why it does not fit."""
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"{spec}: does not fit {arch} ({str(exc).splitlines()[-1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{spec}: does not fit {arch} (missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
