"""SCFS: every term against a slow, per-sample computation written here (docs/methods.md §3, §6).

The method runs in eval mode for these comparisons, so its BatchNorms use running statistics
and a per-sample loop sees exactly what the batched forward sees.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import refused_train

from sslmask.backbones import build_backbone
from sslmask.config import ConfigError, load_settings
from sslmask.losses import search_loss
from sslmask.methods import build_method
from sslmask.methods.scfs import SearchHead, search_attention, search_query
from sslmask.progress import Progress

B, GLOBAL, LOCAL, N_LOCAL = 4, 32, 16, 2


def _method(arch: str = "resnet_tiny", *sets: str):
    taps = ["scfs.vit_blocks=[1, 2]"] if arch.startswith("vit") else []
    cfg = load_settings("scfs", "cpu-demo", [
        f"model.arch={arch}", "model.proj_hidden=32", "model.proj_dim=16", "dino.out_dim=24",
        f"dino.local_crops={N_LOCAL}", f"dino.local_size={LOCAL}", "scfs.head_bottleneck=8",
        "scfs.head_hidden=16", "scfs.head_dim=12", "train.epochs=10", *taps, *sets,
    ])  # fmt: skip
    torch.manual_seed(0)
    return build_method(cfg)


def _blob(size: int, top: int, left: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[:, top : top + h, left : left + w] = 1
    return m


def _batch() -> dict[str, torch.Tensor]:
    """Sample 0 and 3 use their masks; 1 (all foreground) and 2 (an empty global view) fall
    back. Local crop 1 of samples 0 and 1 holds 6 % foreground (gated in sample 0 only)."""
    g = torch.Generator().manual_seed(1)
    batch = {}
    for v in range(2 + N_LOCAL):
        size = GLOBAL if v < 2 else LOCAL
        batch[f"view{v}"] = torch.randn(B, 3, size, size, generator=g)
        masks = []
        for b in range(B):
            if v < 2:
                empty = torch.zeros(1, size, size) if v == 0 else _blob(size, 4, 4, 9, 20)
                special = {1: torch.ones(1, size, size), 2: empty}
                masks.append(special.get(b, _blob(size, 3 + b + v, 5, 17, 13 + v)))
            else:
                small = v == 3 and b in (0, 1)
                masks.append(_blob(size, 2, 3, 4, 4) if small else _blob(size, b, 2 + v, 9, 10))
        batch[f"mask{v}"] = torch.stack(masks)
    return batch


def _ce(target_probs: torch.Tensor, student_logits: torch.Tensor, tau: float) -> float:
    return float(-(target_probs * torch.log_softmax(student_logits / tau, dim=-1)).sum())


def _cell_mean(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area downsampling by explicit block means (sizes here divide evenly)."""
    s = mask.shape[-1]
    out = torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            out[y, x] = mask[0, y * s // h : (y + 1) * s // h, x * s // w : (x + 1) * s // w].mean()
    return out


def _slow_query(grid: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    c, h, w = grid.shape
    total, mass = torch.zeros(c), 0.0
    for y in range(h):
        for x in range(w):
            wt = 1.0 if weights is None else float(weights[y, x])
            total += wt * grid[:, y, x]
            mass += wt
    q = total / (mass + (0 if weights is None else 1e-6))
    return q / q.norm()


def _slow_attention(q: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    _, h, w = key.shape
    out = torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            out[y, x] = torch.dot(q, key[:, y, x]) / key[:, y, x].norm()
    return out


def _one(t: torch.Tensor, b: int) -> torch.Tensor:
    return t[b : b + 1]


@torch.no_grad()
def slow_scfs_loss(m, batch, progress: Progress) -> dict[str, float]:
    """The SCFS loss of ``m`` (in eval mode) with a loop over samples, crops, globals and cells."""
    s, d = m.settings.to_config()["scfs"], m.settings.to_config()["dino"]
    tau_s, temp = d["student_temp"], m.teacher_temp(progress)
    views = [batch[f"view{v}"] for v in range(2 + N_LOCAL)]
    fg = [[float(batch[f"mask{v}"][b].mean()) for b in range(B)] for v in range(2 + N_LOCAL)]
    mode = s["mask_mode"]
    use = [
        mode != "none" and all(s["fallback_min"] <= fg[g][b] <= s["fallback_max"] for g in (0, 1))
        for b in range(B)
    ]
    globals_used = (0, 1) if s["search_globals"] == "both" else (0,)
    dino, n_pairs = 0.0, 2 * (1 + N_LOCAL)
    layer_total, gated, per_sample = 0.0, 0, []
    for b in range(B):
        stu = [m.backbone.stage_features(_one(v, b), m.taps) for v in views]
        tea = [m.teacher_backbone.stage_features(_one(views[g], b), m.taps) for g in (0, 1)]
        logits = [m.head(p)[0] for p, _ in stu]
        targets = [F.softmax((m.teacher_head(p)[0] - m.center[0]) / temp, -1) for p, _ in tea]
        for iq in (0, 1):
            for v in range(2 + N_LOCAL):
                if v != iq:
                    dino += _ce(targets[iq], logits[v], tau_s) / B
        stu_grids_per_view = [grids for _, grids in stu]
        tea_grids_per_view = [grids for _, grids in tea]
        for n in range(N_LOCAL):
            gated += int(use[b] and mode == "key_query_gate" and fg[2 + n][b] < s["gate_min_fg"])
        terms = []
        for i in range(len(m.taps)):
            head, t_head = m.search_heads[i], m.teacher_search_heads[i]
            locals_ = []
            for n in range(N_LOCAL):
                grid = stu_grids_per_view[2 + n][i][0]
                keep = not (use[b] and mode == "key_query_gate" and fg[2 + n][b] < s["gate_min_fg"])
                qw = None
                if use[b] and mode in ("key_query", "key_query_gate"):
                    qw = _cell_mean(batch[f"mask{2 + n}"][b], *grid.shape[-2:])
                q = _slow_query(grid, qw)
                for g in globals_used:
                    key = tea_grids_per_view[g][i][0]
                    a = _slow_attention(q, key)
                    if use[b]:
                        a = a * _cell_mean(batch[f"mask{g}"][b], *key.shape[-2:])
                    target = F.softmax(t_head((a[None] * key)[None])[0] / temp, -1)
                    locals_.append((keep, _ce(target, head(grid[None])[0], tau_s)))
            s_glob = [head(stu_grids_per_view[g][i])[0] for g in (0, 1)]
            t_glob = [
                F.softmax((t_head(tea_grids_per_view[g][i])[0] - m.layer_center[i]) / temp, -1)
                for g in (0, 1)
            ]
            glob = 0.5 * (_ce(t_glob[0], s_glob[1], tau_s) + _ce(t_glob[1], s_glob[0], tau_s))
            terms.append((locals_, glob))
        per_sample.append(terms)
    # the search term is a mean over the kept (sample, crop, global) rows of the whole batch
    for i in range(len(m.taps)):
        rows = [(k, ce) for terms in per_sample for k, ce in terms[i][0]]
        kept = [ce for k, ce in rows if k]
        local = sum(kept) / max(len(kept), 1)
        glob = sum(terms[i][1] for terms in per_sample) / B
        layer_total += 0.5 * (glob + local) if s["layer_global_term"] else local
    return {
        "loss": dino / n_pairs + layer_total,
        "loss_dino": dino / n_pairs,
        "fallback": 1 - sum(use) / B if mode != "none" else math.nan,
        "gated": gated / (B * N_LOCAL),
    }


CASES = [
    ("resnet_tiny", "none", "both", True),
    ("resnet_tiny", "none", "first", False),
    ("resnet_tiny", "key", "both", True),
    ("resnet_tiny", "key_query", "first", True),
    ("resnet_tiny", "key_query_gate", "both", True),
    ("resnet_tiny", "key_query_gate", "both", False),
    ("vit_micro", "key_query_gate", "both", True),
]


@pytest.mark.parametrize(("arch", "mode", "globals_", "layer_global"), CASES)
def test_scfs_loss_equals_a_per_sample_loop(arch, mode, globals_, layer_global):
    m = _method(arch, f"scfs.mask_mode={mode}", f"scfs.search_globals={globals_}",
                f"scfs.layer_global_term={str(layer_global).lower()}", "model.out_stride=16")  # fmt: skip
    g = torch.Generator().manual_seed(3)
    m.center.copy_(torch.randn(m.center.shape, generator=g))
    m.layer_center.copy_(0.3 * torch.randn(m.layer_center.shape, generator=g))
    for p in m.teacher_search_heads.parameters():  # a teacher that differs from the student
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.eval()
    batch = _batch()
    at37 = Progress(37, 100, 100 // m.settings.train.epochs)  # as when the step came with train.epochs
    out = m(batch, at37)
    ref = slow_scfs_loss(m, batch, at37)
    assert float(out["loss_dino"]) == pytest.approx(ref["loss_dino"], rel=1e-5)
    assert float(out["loss"]) == pytest.approx(ref["loss"], rel=1e-5)
    if mode == "none":
        assert "fallback" not in out and "gated" not in out
    else:
        assert float(out["fallback"]) == pytest.approx(ref["fallback"]) == 0.5
        assert float(out["gated"]) == pytest.approx(ref["gated"])
        assert ref["gated"] == (1 / 8 if mode == "key_query_gate" else 0)


def test_search_query_and_attention_equal_loops():
    g = torch.Generator().manual_seed(0)
    grid, keys = torch.randn(3, 5, 4, 3, generator=g), torch.randn(3, 5, 2, 6, generator=g)
    weights = torch.rand(3, 1, 4, 3, generator=g)
    for w in (None, weights):
        q = search_query(grid, w)
        for n in range(3):
            ref = _slow_query(grid[n], None if w is None else w[n, 0])
            torch.testing.assert_close(q[n], ref, rtol=1e-5, atol=1e-6)
            a = search_attention(q, keys)
            torch.testing.assert_close(a[n, 0], _slow_attention(q[n], keys[n]), rtol=1e-5, atol=1e-6)
    assert search_attention(q, keys).abs().max() <= 1 + 1e-6  # cosines, no softmax


def test_search_query_with_an_empty_mask_falls_back_to_gap():
    grid = torch.randn(2, 4, 3, 3)
    q = search_query(grid, torch.zeros(2, 1, 3, 3))
    torch.testing.assert_close(q, F.normalize(grid.mean(dim=(2, 3)), dim=1))


def test_search_loss_is_a_weighted_mean_of_row_cross_entropies():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), F.softmax(torch.randn(6, 5, generator=g), -1)
    w = torch.tensor([1, 0, 1, 1, 0, 1.0])
    ref = sum(_ce(t[r], s[r], 0.1) for r in range(6) if w[r]) / 4
    assert float(search_loss(s, t, w, 0.1)) == pytest.approx(ref, rel=1e-6)
    assert float(search_loss(s, t, torch.zeros(6), 0.1)) == 0.0  # every crop gated: no term


def test_search_head_is_a_residual_bottleneck_with_a_unit_output():
    head = SearchHead(8, bottleneck=4, hidden=16, out_dim=6).eval()
    x = torch.randn(3, 8, 5, 5)
    out = head(x)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    with torch.no_grad():  # zero the last BN: the block is the identity, then ReLU and GAP
        head.block[-1].weight.zero_()
        head.block[-1].bias.zero_()
    pooled = F.relu(x).mean(dim=(2, 3))
    torch.testing.assert_close(out := head(x), F.normalize(head.mlp(pooled), dim=1))
    assert out.shape == (3, 6)


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_micro"])
def test_stage_features_end_with_the_backbones_own_grid(arch):
    bb = build_backbone(arch, 16).eval()
    taps = [1, 2] if arch == "vit_micro" else [2, 3, 4]
    x = torch.randn(2, 3, 48, 48)
    pooled, grids = bb.stage_features(x, taps)
    ref_pooled, ref_grid = bb.features(x)
    torch.testing.assert_close(grids[-1], ref_grid)
    torch.testing.assert_close(pooled, ref_pooled)
    assert [g.shape[1] for g in grids] == bb.stage_channels(taps)
    with pytest.raises(ValueError, match="taps"):
        bb.stage_channels([0, 9])


def test_teacher_heads_follow_the_student_by_ema_and_get_no_gradient():
    m = _method("resnet_tiny", "scfs.mask_mode=key")
    out = m(_batch(), Progress(0, 10, 10))
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher_search_heads.parameters())
    assert all(p.grad is not None for p in m.search_heads.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in m.search_heads.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher_search_heads.parameters()]
    centre = m.layer_center.clone()
    tau = m.after_optimizer_step(Progress(0, 10, 10))["tau"]
    for p, old, s in zip(
        m.teacher_search_heads.parameters(), before, m.search_heads.parameters(), strict=True
    ):
        torch.testing.assert_close(p, tau * old + (1 - tau) * s)
    assert not torch.equal(m.layer_center, centre)  # the per-stage centres moved


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["scfs.mask_mode=foreground"], "scfs.mask_mode='foreground': must be one of none, key"),
        (["scfs.search_globals=all"], "scfs.search_globals='all': must be one of first, both"),
        (["dino.local_crops=0"], "dino.local_crops must be >= 1"),
        (["scfs.layers=[4, 2]"], "increasing"),
        (["scfs.layers=[1, 5]"], "ResNet taps are stages 1..4"),
        (["model.arch=vit_micro", "scfs.vit_blocks=[4, 8, 12]"], "ViT taps are blocks 1..2"),
        (["scfs.gate_min_fg=1.5"], "scfs.gate_min_fg=1.5: must be in [0, 1)"),
        (
            ["scfs.fallback_min=0.9", "scfs.fallback_max=0.1"],
            "scfs.fallback_min=0.9 must be below fallback_max=0.1",
        ),
    ],
)
def test_bad_scfs_values_are_one_clear_line(sets, message, tmp_path, sample_build, capsys):
    assert message in refused_train("scfs", sample_build, tmp_path / "r", [*sets], capsys)


def test_scfs_reads_masks_only_in_a_mask_mode():
    from sslmask.methods import METHODS

    assert not METHODS["scfs"].uses_masks(load_settings("scfs"))
    assert METHODS["scfs"].uses_masks(load_settings("scfs", None, ["scfs.mask_mode=key"]))
    with pytest.raises(ConfigError, match="unknown config key 'scfs.mode'"):
        load_settings("scfs", None, ["scfs.mode=key"])
