"""``--method deep [--head FILE]``: soft maps from a trained saliency head (``maskgen deep fit``).

Without ``--head`` the head shipped with the package is used (``default_head.safetensors``;
docs/deep.md says how it was made and what it scores).

Each build worker loads the network once (the method is cached per worker process) and runs
it batched at a fixed short side. With a GPU, every shard task asks Ray for ``gpu_share`` of
one (default 0.25), so four worker processes share a GPU and one's decoding and PNG/tar
writing overlaps the others' forward passes; the network runs in bfloat16 autocast with
channels_last there (``precision=auto``). On CPU it runs in float32, one thread per worker.

JPEG decoding (``decode=auto``) happens on the GPU when there is one: the worker reads only a
plain JPEG's header and the method decodes the bytes with ``torchvision.io.decode_jpeg`` on the
device (nvJPEG), resizes there, and only the maps come back; any other file (PNG, CMYK, EXIF
rotated) is decoded by the worker as before. ``decode=device`` forces that path (on CPU it
uses torchvision's libjpeg decoder), ``decode=pil`` the worker's. A JPEG the device decoder
refuses is recorded as a decode error and skipped, like one PIL refuses.

``refine=1`` puts the map on the image's own regions as DRFI's map is: pooled over the
regions of DRFI's three segmentation levels, then DRFI's refinement on the finest
(``maskgen.methods.drfi.refine.refine_on_image``). The network sees the image at 224 pixels
and its map is upsampled from 16-pixel cells, so its boundaries are soft; the regions put them
back on the image's edges. It runs on the CPU, in the worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.methods.base import Resources, SaliencyMethod, param_choice, param_number

GPU_BATCH, CPU_BATCH = 64, 8
DEFAULT_HEAD = Path(__file__).parent / "default_head.safetensors"
DECODERS = ("auto", "pil", "device")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DeepSaliency(SaliencyMethod):
    """Plans from the head file's metadata; each worker loads the weights on first use.

    The planner (where ``maskgen build`` runs) reads only the head's metadata and decides the
    Ray resources, batch size and decoding from whether *it* sees a GPU; the network is loaded
    in the worker, on whatever device that worker really has, and :meth:`runtime_params` says
    which (recorded in every sample, so a GPU build that fell back to the CPU shows).
    """

    name = "deep"

    def __init__(
        self,
        head: str | None = None,
        short_side: int | None = None,
        precision: str = "auto",
        gpu_share: float = 0.25,
        refine: bool | int = False,
        backend: str | None = None,
        decode: str = "auto",
    ):
        import torch  # here, not at module level: the other methods' workers never import torch

        from maskgen.methods.deep.model import PRECISIONS, HeadFileError, check_head, read_head_meta

        param_choice("precision", precision, ("auto", *PRECISIONS))
        param_number("gpu_share", gpu_share, low=0.0, strict=True, high=1.0)
        param_choice("decode", decode, DECODERS)
        self.refine = bool(int(refine))
        if decode == "device" and self.refine:
            raise ValueError("deep: refine=1 needs the decoded image on the CPU; use decode=pil or auto")

        self.head_path = Path(head) if head else DEFAULT_HEAD
        try:
            self.meta = read_head_meta(self.head_path)
            check_head(self.head_path)
        except HeadFileError as exc:
            raise ValueError(str(exc)) from None
        if short_side is None:
            short_side = self.meta.get("short_side", 224)
        self.short_side = int(param_number("short_side", short_side, low=16, integer=True))
        self.sha256 = _sha256(self.head_path)
        self.precision_arg = precision
        self.gpu_share = float(gpu_share)
        self.decode_arg = decode
        # the plan: what the machine that starts the build sees decides what Ray is asked for
        planned = "cuda" if torch.cuda.is_available() else "cpu"
        self.resources = Resources(num_cpus=1.0, num_gpus=self.gpu_share if planned == "cuda" else 0.0)
        self.batch_size = GPU_BATCH if planned == "cuda" else CPU_BATCH
        # auto: on a GPU, unless refine needs the pixels on the CPU anyway
        self.decodes_jpeg = decode == "device" or (decode == "auto" and planned == "cuda" and not self.refine)
        self.backend = None
        if self.refine:
            from maskgen.methods.drfi.segment import resolve_backend

            self.backend = resolve_backend(backend, "deep")
        self._net = None
        self.device: str | None = None  # set in the worker, by the first batch
        self.precision: str | None = None

    def _ready(self):
        """The network on this process's device (loaded once per worker process)."""
        if self._net is None:
            import torch

            from maskgen.methods.deep.model import HeadFileError, load_head, prepare_for_device

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            arg = self.precision_arg
            self.precision = arg if arg != "auto" else ("bf16" if self.device == "cuda" else "fp32")
            try:
                net, _ = load_head(self.head_path)
            except HeadFileError as exc:
                raise ValueError(str(exc)) from None
            self._net = prepare_for_device(net, self.device)
        if self.device == "cpu":
            import torch

            torch.set_num_threads(1)  # one thread per build worker, like the other CPU methods
        return self._net

    def runtime_params(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.precision} if self.device else {}

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
            "precision": self.precision_arg,  # as asked: auto is bf16 on a GPU, fp32 on CPU
            # as asked, and only when not the default, so earlier builds keep their parameters
            **({"decode": self.decode_arg} if self.decode_arg != "auto" else {}),
            **({"refine": True, "backend": self.backend} if self.refine else {}),
        }

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        from maskgen.methods.deep.model import predict_maps

        net = self._ready()
        maps = predict_maps(net, list(images), self.short_side, self.device, self.precision)
        if self.refine:
            from maskgen.methods.drfi.refine import refine_on_image

            maps = [refine_on_image(m, im, backend=self.backend) for m, im in zip(maps, images, strict=True)]
        return maps

    def predict_encoded(self, inputs: Sequence[bytes | np.ndarray]) -> list[np.ndarray]:
        """Plain JPEG bytes decoded on the device, mixed with images the worker decoded."""
        from maskgen.imaging import ImageDecodeError
        from maskgen.methods.deep.model import JpegDecodeError, predict_maps_encoded

        net = self._ready()
        try:
            return predict_maps_encoded(net, list(inputs), self.short_side, self.device, self.precision)
        except JpegDecodeError as exc:
            raise ImageDecodeError("truncated_or_corrupt", str(exc)) from None
