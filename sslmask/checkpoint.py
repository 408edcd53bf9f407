"""Checkpoints: atomic writes, safe loads (``weights_only=True``), backbone extraction.

Backbones load from sslmask runs and exports, torchvision, MoCo v2/v3, DINO, BYOL/solo-learn
and safetensors files (see ``backbone_state``). A run directory holds ``checkpoint.pt``: ``{"method": state_dict, "optimizer": ...,
"scaler": ..., "step": int, "config": dict, "rng": {...}, "eval_branch": str}``. ``sslmask
export`` writes one trunk alone (the branch the method's reference evaluates, unless told
otherwise), with torchvision's or timm's parameter names.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from maskio.atomic import atomic_open
from maskio.errors import CheckpointError

# a run folder's files (written by sslmask.engine), named in maskio.outputs beside the guard that
# keeps every writer's --out off them
from maskio.outputs import CHECKPOINT, CONFIG_FILE, INDEX_CACHE, LOG_FILE, RUN_FILES
from sslmask.backbones import ARCHS, Backbone, build_backbone

__all__ = [
    "CHECKPOINT",
    "CONFIG_FILE",
    "INDEX_CACHE",
    "LOG_FILE",
    "RUN_FILES",
    "CheckpointError",
    "backbone_state",
    "infer_arch",
    "init_backbone",
    "load_backbone",
    "load_backbone_branch",
    "load_file",
    "save_atomic",
]

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
        with warnings.catch_warnings():  # torch's pickle-protocol warning would precede the one line
            warnings.simplefilter("ignore", UserWarning)
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


# Which trunk of a self-supervised run is scored and exported. ``online``: the network the
# optimiser trains (BYOL's online, MoCo's query encoder, DINO's student); ``momentum``: its EMA
# copy (BYOL's target, MoCo's key encoder, DINO's teacher); ``auto``: what the method's
# reference code evaluates (DINO and SCFS: the teacher; every other method: the online one).
BRANCHES = ("auto", "online", "momentum")
BRANCH_ALIASES = {"student": "online", "query": "online", "teacher": "momentum", "key": "momentum",
                  "target": "momentum"}  # fmt: skip
DINO_BRANCH = {"online": "student", "momentum": "teacher"}  # DINO's own checkpoint keys
# each method's SSLMethod.eval_branch, for runs saved before checkpoints recorded it (a test keeps
# the two equal; the classes cannot be imported here without a cycle)
METHOD_EVAL_BRANCH = {"dino": "momentum", "scfs": "momentum"}  # every other method: "online"


def recorded_branch(run: dict[str, Any]) -> str:
    """The branch a run checkpoint says its method's protocol scores: ``eval_branch``, or for a
    run saved before that key existed, the branch of the method its config names."""
    if isinstance(run.get("eval_branch"), str):
        return run["eval_branch"]
    config = run.get("config")
    method = config.get("method") if isinstance(config, dict) else None
    return METHOD_EVAL_BRANCH.get(method, "online") if isinstance(method, str) else "online"


def canonical_branch(branch: str) -> str:
    """``branch`` or one of its aliases as ``auto``/``online``/``momentum`` (CheckpointError otherwise)."""
    name = BRANCH_ALIASES.get(branch, branch)
    if name not in BRANCHES:
        choices = ", ".join([*BRANCHES, *BRANCH_ALIASES])
        raise CheckpointError(f"--branch {branch!r}: must be one of {choices}")
    return name


def _trunk_prefixes(state: dict[str, Any]) -> list[str]:
    """Prefixes under which a whole trunk sits in a method's state_dict (``backbone.``,
    ``teacher_backbone.``, ``key_backbone.`` ...)."""
    return sorted(k[: -len(m)] for k in state for m in ("conv1.weight", "cls_token") if k.endswith(m))


def run_branch_prefix(method_state: dict[str, Any], branch: str) -> str:
    """The prefix of the ``online`` or ``momentum`` trunk in an sslmask run's method state."""
    if branch == "online":
        return BACKBONE_PREFIX
    others = [
        p for p in _trunk_prefixes(method_state) if p.endswith(BACKBONE_PREFIX) and p != BACKBONE_PREFIX
    ]
    if len(others) != 1:
        raise CheckpointError("this run has no momentum encoder to score; use --branch online")
    return others[0]


def resolve_branch(obj: Any, branch: str = "auto") -> str | None:
    """The branch ``backbone_state(obj, branch)`` reads: ``online`` or ``momentum`` for an sslmask
    run (``auto``: the one the run recorded as its method's protocol, ``eval_branch``), ``student``
    or ``teacher`` for DINO's own checkpoints, None for a single-trunk file."""
    branch = canonical_branch(branch)
    if isinstance(obj, dict) and isinstance(obj.get("method"), dict):
        return recorded_branch(obj) if branch == "auto" else branch
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        return "teacher" if branch == "auto" else DINO_BRANCH[branch]
    if branch != "auto":
        raise CheckpointError(f"--branch {branch}: this checkpoint holds one trunk, not a run's two")
    return None


def backbone_state(obj: Any, branch: str = "auto") -> dict[str, torch.Tensor]:
    """The trunk's tensors (ResNet: torchvision-named; ViT: timm-named), from the checkpoint formats in use.

    Accepts an sslmask run checkpoint (``branch``: see :func:`resolve_branch`), DINO's
    ``{"teacher", "student"}`` (DINO evaluates the teacher), ``{"state_dict": ...}`` /
    ``{"model": ...}`` wrappers (MoCo, solo-learn, torchvision references), and flat state
    dicts, with the prefixes in ``TRUNK_PREFIXES``. Projection heads and ``fc`` are dropped.
    """
    resolved = resolve_branch(obj, branch)
    if isinstance(obj, dict) and isinstance(obj.get("method"), dict):
        state = {k: v for k, v in obj["method"].items() if not k.endswith("_extra_state")}  # SegAS's clusters
        prefix = run_branch_prefix(state, resolved)
        obj = {BACKBONE_PREFIX + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    elif isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        obj = obj[resolved]
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


def load_backbone(
    spec: str, arch: str | None = None, out_stride: int | None = None, branch: str = "auto"
) -> Backbone:
    """A backbone from a run folder, a checkpoint/state_dict file, or ``random`` (with ``arch``)."""
    return load_backbone_branch(spec, arch, out_stride, branch)[0]


def load_backbone_branch(
    spec: str, arch: str | None = None, out_stride: int | None = None, branch: str = "auto"
) -> tuple[Backbone, str | None]:
    """:func:`load_backbone` and the branch it read (``online``/``momentum`` for a run, DINO's
    ``student``/``teacher``, None for a one-trunk file or ``random``): what an evaluation scored."""
    if spec == "random":
        if not arch:
            raise CheckpointError("--checkpoint random needs --arch")
        if canonical_branch(branch) != "auto":
            raise CheckpointError(f"--branch {branch}: a random backbone has no branches")
        try:
            return build_backbone(arch, out_stride or 32), None
        except ValueError as exc:  # an unknown --arch
            raise CheckpointError(f"--arch {arch}: {exc}") from None
    obj, state, resolved = _read_trunk(spec, branch)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        model_cfg = obj["config"].get("model")
        if not isinstance(model_cfg, dict):
            raise CheckpointError(f"{spec}: its config has no model section")
        arch = arch or model_cfg.get("arch")
        out_stride = out_stride or model_cfg.get("out_stride")
    if arch is None:
        arch, _ = infer_arch(state)
    try:
        backbone = build_backbone(arch, out_stride or 32)
    except ValueError as exc:  # an unknown arch or stride (from --arch or the run's config)
        raise CheckpointError(f"{spec}: {exc}") from None
    _fill(backbone, state, spec, arch)
    return backbone, resolved


def init_backbone(backbone: torch.nn.Module, spec: str, arch: str) -> None:
    """Start ``backbone`` (an ``arch``) from the trunk of checkpoint ``spec`` (``model.init``).

    ``spec`` is anything ``load_backbone`` reads: a run folder, an export, a torchvision, timm,
    DINO or MoCo checkpoint (its evaluated branch). Every tensor must fit; BatchNorm statistics
    come along.
    """
    _, state, _ = _read_trunk(spec)
    _fill(backbone, state, spec, arch)


def _read_trunk(spec: str, branch: str = "auto") -> tuple[Any, dict[str, torch.Tensor], str | None]:
    """The checkpoint object at ``spec`` (a file or a run folder), its trunk's tensors and the
    branch they came from."""
    path = Path(spec)
    obj = load_file(run_checkpoint_path(path) if path.is_dir() else path)
    try:
        return obj, backbone_state(obj, branch), resolve_branch(obj, branch)
    except CheckpointError as exc:
        raise CheckpointError(f"{spec}: {exc}") from None


def _fill(backbone: torch.nn.Module, state: dict[str, torch.Tensor], spec: str, arch: str) -> None:
    """Copy ``state`` into ``backbone``, or one line saying why it does not fit (a NaN or
    infinite weight included: such a trunk scored 25 % k-NN instead of being refused)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{spec}: {name} holds non-finite values (NaN or inf)")
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"{spec}: does not fit {arch} ({str(exc).splitlines()[-1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{spec}: does not fit {arch} (missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
