"""``--method deep --head FILE``: soft maps from a trained saliency head (``maskgen deep fit``).

This runs the network in each build worker, one image at a time at a fixed short side, on
the GPU when the worker has one. (The batched GPU actor pool of issue 4 is not built yet.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.methods.base import SaliencyMethod


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DeepSaliency(SaliencyMethod):
    name = "deep"
    batch_size = 8

    def __init__(self, head: str | None = None, short_side: int | None = None):
        if not head:
            raise ValueError("--method deep needs --head FILE (made by `maskgen deep fit`)")
        import torch  # here, not at module level: the other methods' workers never import torch

        from maskgen.methods.deep.model import HeadFileError, load_head

        self.head_path = Path(head)
        try:
            self.net, self.meta = load_head(self.head_path)
        except HeadFileError as exc:
            raise ValueError(str(exc)) from None
        self.short_side = int(short_side or self.meta["short_side"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net.to(self.device)
        self.sha256 = _sha256(self.head_path)

    @classmethod
    def canonical_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        out = dict(args)
        if out.get("head"):
            out["head"] = str(Path(out["head"]).expanduser().resolve())
        return out

    @property
    def params(self) -> dict[str, Any]:
        return {
            "head": self.head_path.name,
            "head_sha256": self.sha256[:16],
            "arch": self.meta["arch"],
            "out_stride": self.meta["out_stride"],
            "short_side": self.short_side,
        }

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        from maskgen.methods.deep.model import predict_maps

        if self.device == "cpu":
            torch.set_num_threads(1)  # one thread per build worker, like the other CPU methods
        return predict_maps(self.net, list(images), self.short_side, self.device)
