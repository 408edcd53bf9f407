"""Vision Transformer trunks: timm's ``VisionTransformer`` (what the MoCo v3 reference builds
on), giving the same things a ResNet trunk gives.

- ``forward(x)``: the feature grid, N x C x h x w: the patch tokens after the final norm,
  reshaped (stride 16), which is what HARL pools masks on and ``deep``'s head reads;
- ``pooled(x)``: the CLS token (what k-NN, the linear probe and the projection heads use);
- ``features(x)``: both from one pass;
- ``stage_features(x, taps)``: the CLS token and the grids after the tapped blocks;
- ``attention_maps(x)``: each block's self-attention averaged over heads, N x T x T with the
  CLS token first. Only this call pays for them: the normal forward keeps timm's fused kernel.

Parameter names are timm's, so an export loads into ``timm.create_model("vit_small_patch16_224")``
with only the classifier missing, and DINO's and MoCo v3's published ViT checkpoints (the same
names under their prefixes) load here. Any input size works (the position embedding is
interpolated, and a side that is not a multiple of 16 is padded up to one), so multi-crop's
96 px local views run on a 224 px model and the deep head sees images at their own aspect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

# name: (embed_dim, depth, heads); the timm names are vit_{tiny,small,base}_patch16_224
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_micro": (48, 2, 3),  # for CPU tests and the offline demo
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
TIMM_NAMES = {k: f"{k}_patch16_224" for k in ("vit_tiny", "vit_small", "vit_base")}
PATCH = 16


class ViTTrunk(VisionTransformer):
    """timm's ViT-*/16 without a classifier; ``forward`` -> the patch-token grid."""

    is_vit = True

    def __init__(self, embed_dim: int, depth: int, heads: int):
        super().__init__(img_size=224, patch_size=PATCH, embed_dim=embed_dim, depth=depth, num_heads=heads,
                         num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)  # fmt: skip
        self.out_stride = PATCH

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CLS token N x C, grid N x C x h x w)`` from one pass."""
        tokens = self.forward_features(x)
        n, _, c = tokens.shape
        h, w = -(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH)  # padded up to whole patches
        grid = tokens[:, self.num_prefix_tokens :].transpose(1, 2).reshape(n, c, h, w)
        return tokens[:, 0], grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    def stage_features(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(CLS token N x C, [patch grid after block b for b in taps])`` from one pass (blocks
        numbered from 1). Each grid goes through the final LayerNorm, as DINO's
        ``get_intermediate_layers`` and timm's ``forward_intermediates(norm=True)`` do, so the
        last block's grid is ``forward``'s."""
        self.stage_channels(taps)
        final, grids = self.forward_intermediates(
            x, indices=[b - 1 for b in taps], norm=True, output_fmt="NCHW"
        )
        return final[:, 0], list(grids)

    def stage_channels(self, taps: Sequence[int]) -> list[int]:
        """The channels of each tapped block's grid (ValueError for a block that does not exist)."""
        depth = len(self.blocks)
        if not taps or any(not 1 <= b <= depth for b in taps):
            raise ValueError(f"ViT taps are blocks 1..{depth}, got {list(taps)}")
        return [self.embed_dim] * len(taps)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the softmaxed attention averaged over heads: N x T x T (T = 1 + patches)."""
        return self.pooled_and_attention(x)[1]

    @torch.no_grad()
    def pooled_and_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(CLS token, attention_maps)`` from one pass (LoDisc's momentum encoder needs both)."""
        maps: list[torch.Tensor] = []
        hooks, fused = [], []
        for blk in self.blocks:
            fused.append(blk.attn.fused_attn)
            blk.attn.fused_attn = False  # the explicit path, whose softmax passes through attn_drop
            hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.mean(dim=1))))
        try:
            tokens = self.forward_features(x)
        finally:
            for blk, f, h in zip(self.blocks, fused, hooks, strict=True):
                blk.attn.fused_attn = f
                h.remove()
        return tokens[:, 0], maps


def build_vit(arch: str) -> ViTTrunk:
    return ViTTrunk(*VIT_ARCHS[arch])
