"""``sslmask export``: one trunk of a run (by default the one its method's reference evaluates)
as a bare, torchvision- or timm-named state_dict."""

from __future__ import annotations

from pathlib import Path

from maskio.errors import ShardError
from maskio.outputs import refuse_protected
from sslmask.checkpoint import (
    RUN_FILES,
    CheckpointError,
    backbone_state,
    load_file,
    resolve_branch,
    run_checkpoint_path,
    save_atomic,
)


def export_backbone(run: str | Path, out: str | Path, branch: str = "auto") -> dict[str, int | str]:
    """Write the backbone tensors of ``run`` (a run folder or its checkpoint file) to ``out``
    (``torch.save``, or safetensors when ``out`` ends in ``.safetensors``).

    ``torchvision.models.resnet50().load_state_dict(torch.load(out), strict=False)`` then
    reports only ``fc.weight`` and ``fc.bias`` missing (the classifier is not trained here).
    """
    path, out = Path(run), Path(out)
    run_dir = path if path.is_dir() else path.parent
    if out.resolve() in {f.resolve() for f in (path, *(run_dir / name for name in RUN_FILES))}:
        raise CheckpointError(f"--out {out}: is a file of the run {run_dir} itself; export to another path")
    try:
        refuse_protected(out)
    except ShardError as exc:
        raise CheckpointError(str(exc)) from None
    ckpt = load_file(run_checkpoint_path(path) if path.is_dir() else path)
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise CheckpointError(f"{run}: not an sslmask run checkpoint")
    try:
        state = {k: v.contiguous() for k, v in backbone_state(ckpt, branch).items()}
        scored = resolve_branch(ckpt, branch)
    except CheckpointError as exc:
        raise CheckpointError(f"{run}: {exc}") from None
    if not out.parent.is_dir():  # a typo in the folder should not create a tree of folders
        raise CheckpointError(f"--out {out}: folder {out.parent} does not exist")
    save_atomic(state, out, metadata={"branch": scored} if out.suffix == ".safetensors" else None)
    return {
        "branch": scored,
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "step": int(ckpt["step"]),
    }
