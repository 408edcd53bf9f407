"""LoDisc and leave-one-out retrieval, against slow computations written here (docs/methods.md §5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import refused_train, tiny_train_args

from sslmask.config import load_config, load_settings
from sslmask.eval.retrieval import retrieval_metrics
from sslmask.losses import moco_v3_loss
from sslmask.methods import build_method
from sslmask.methods.lodisc import fused_attention, mask_patches, patch_saliency, select_patches
from sslmask.progress import Progress


def _method(*sets: str):
    cfg = load_settings("lodisc", "cpu-demo", ["model.arch=vit_micro", "model.proj_hidden=32", "model.pred_hidden=32",
                                             "model.proj_dim=16", *sets])  # fmt: skip
    torch.manual_seed(0)
    return build_method(cfg)


def test_fused_attention_is_the_log_of_the_per_layer_product():
    g = torch.Generator().manual_seed(0)
    maps = [F.softmax(torch.randn(2, 5, 5, generator=g) * 3, -1) for _ in range(12)]
    fused = fused_attention(maps)
    for n in range(2):
        for j in range(4):
            product = 1.0
            for layer in maps:  # in float64: 12 layers of probabilities
                product *= float(layer[n, 0, 1 + j].double())
            assert float(fused[n, j]) == pytest.approx(math.log(product), rel=1e-5)


def test_fused_attention_does_not_underflow_where_the_plain_product_does():
    maps = [torch.full((1, 3, 3), 1e-5) for _ in range(12)]  # product 1e-60: 0 in float32
    assert float(torch.stack([m[:, 0, 1:] for m in maps]).prod(0)[0, 0]) == 0.0
    fused = fused_attention(maps)
    assert torch.isfinite(fused).all() and float(fused[0, 0]) == pytest.approx(12 * math.log(1e-5), rel=1e-5)


def _slow_select(n_keep, grid, attn, sal, mode, gamma=1.0, salient_min=0.5):
    """Per image, with Python sorts over (key, index) tuples."""
    h, w = grid
    out = []
    for i in range(attn.shape[0] if attn is not None else sal.shape[0]):
        idx = list(range(h * w))
        if mode == "attention":
            ranked = sorted(idx, key=lambda j: (-float(attn[i, j]), j))
        elif mode == "saliency":

            def centre(j):
                return (j // w - (h - 1) / 2) ** 2 + (j % w - (w - 1) / 2) ** 2

            by_centre = sorted(idx, key=lambda j: (centre(j), j))
            ranked = sorted(by_centre, key=lambda j: -float(sal[i, j]))
        else:
            salient = [j for j in idx if sal[i, j] > salient_min]
            rest = [j for j in idx if j not in salient]
            salient.sort(key=lambda j: (-(float(sal[i, j]) ** gamma * math.exp(float(attn[i, j]))), j))
            rest.sort(key=lambda j: (-float(attn[i, j]), j))
            ranked = salient + rest
        keep = torch.zeros(h * w, dtype=torch.bool)
        keep[ranked[:n_keep]] = True
        out.append(keep)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["attention", "saliency", "product"])
def test_patch_selection_equals_a_per_image_sort(mode):
    g = torch.Generator().manual_seed(1)
    grid = (4, 5)
    attn = torch.randn(6, 20, generator=g)
    sal = (torch.rand(6, 20, generator=g) * 4).floor() / 3  # many ties, some above 0.5
    sal[0] = 0  # an image with no salient patch: product fills by attention, saliency by centre
    for n_keep in (1, 7, 14, 20):
        fast = select_patches(n_keep, grid, attn, sal, mode, gamma=1.0)
        assert torch.equal(fast, _slow_select(n_keep, grid, attn, sal, mode)), n_keep
        assert (fast.sum(1) == n_keep).all()


def test_product_mode_keeps_salient_patches_first_and_fills_by_attention():
    attn = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    sal = torch.tensor([[0.0, 0.0, 0.9, 0.0, 0.6, 0.0]])
    keep = select_patches(4, (2, 3), attn, sal, "product")
    assert keep[0].tolist() == [True, True, True, False, True, False]  # patches 2, 4, then 0, 1


def test_patch_saliency_and_masking_equal_loops():
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(2, 1, 40, 35, generator=g) > 0.4).float()  # padded to 48 x 48: a 3 x 3 grid
    sal = patch_saliency(mask, (3, 3))
    x = torch.randn(2, 3, 40, 35, generator=g)
    keep = torch.rand(2, 9, generator=g) > 0.5
    masked = mask_patches(x, keep, (3, 3))
    for n in range(2):
        for p in range(9):
            y, xx = divmod(p, 3)
            block = mask[n, 0, 16 * y : 16 * y + 16, 16 * xx : 16 * xx + 16]
            assert float(sal[n, p]) == pytest.approx(float(block.sum()) / 256)
            pix = masked[n, :, 16 * y : 16 * y + 16, 16 * xx : 16 * xx + 16]
            ref = x[n, :, 16 * y : 16 * y + 16, 16 * xx : 16 * xx + 16] * float(keep[n, p])
            assert torch.equal(pix, ref)


def _batch(size=48):
    g = torch.Generator().manual_seed(3)
    batch = {}
    for v in range(2):
        batch[f"view{v}"] = torch.randn(4, 3, size, size, generator=g)
        mask = torch.zeros(4, 1, size, size)
        mask[:, :, 8:40, 10:30] = 1
        mask[1] = 1  # all foreground: falls back to attention
        batch[f"mask{v}"] = mask
    return batch


@pytest.mark.parametrize("mode", ["attention", "saliency", "product"])
def test_lodisc_loss_is_the_four_contrastive_terms(mode):
    m = _method(f"lodisc.mode={mode}").eval()  # eval: no dropout, running BN statistics
    batch = _batch()
    out = m(batch, Progress(0, 10, 10))
    tau = m.mocov3.temperature
    with torch.no_grad():
        q = [m.predictor(m.projector(m.backbone.pooled(batch[f"view{v}"]))) for v in range(2)]
        k, km = [], []
        for v in range(2):
            x = batch[f"view{v}"]
            _, maps = m.key_backbone.pooled_and_attention(x)
            attn, sal = fused_attention(maps), patch_saliency(batch[f"mask{v}"], (3, 3))
            keep = _slow_select(2, (3, 3), attn, sal, mode)  # r = 0.7 masks 7 of 9: floor(9 x 0.3) = 2 kept
            fallback = batch[f"mask{v}"].mean(dim=(1, 2, 3)) > 0.99
            keep = torch.where(fallback[:, None], _slow_select(2, (3, 3), attn, None, "attention"), keep)
            k.append(m.key_projector(m.key_backbone.pooled(x)))
            km.append(m.key_projector(m.key_backbone.pooled(mask_patches(x, keep, (3, 3)))))
    terms = [moco_v3_loss(q[0], k[1], tau), moco_v3_loss(q[1], k[0], tau)]
    local = [moco_v3_loss(q[0], km[1], tau), moco_v3_loss(q[1], km[0], tau)]
    assert float(out["loss_global"]) == pytest.approx(float(sum(terms)), rel=1e-5)
    assert float(out["loss_local"]) == pytest.approx(float(sum(local)), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(sum(terms) + sum(local)), rel=1e-5)
    if mode != "attention":
        assert float(out["fallback"]) == 0.25


def test_saliency_mode_extracts_no_attention_unless_a_sample_falls_back(monkeypatch):
    m = _method("lodisc.mode=saliency")
    batch = _batch()
    for v in range(2):
        batch[f"mask{v}"][1] = batch[f"mask{v}"][0]  # no fallback left
    calls = []
    original = m.key_backbone.pooled_and_attention
    monkeypatch.setattr(m.key_backbone, "pooled_and_attention", lambda x: calls.append(1) or original(x))
    m(batch, Progress(0, 10, 10))
    assert calls == []
    m(_batch(), Progress(0, 10, 10))  # one all-foreground sample per view: attention for its fallback
    assert len(calls) == 2


def test_the_momentum_encoder_moves_as_the_references_four_updates_per_step():
    """builder.py moves the momentum encoder four times per training step (forward, twice in
    m_extract_attention, images() for the logged accuracy), each towards the same online
    weights: the step here must land where four such updates at m land (issue 42 item 2)."""
    m = _method()
    before = [p.clone() for p in m.key_backbone.parameters()]
    m(_batch(), Progress(0, 10, 10))["loss"].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, m.key_backbone.parameters(), strict=True))
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.1)
    tau = m.after_optimizer_step(Progress(3, 10, 10))["tau"]
    base = m.settings.ema.tau_base
    m_step = 1 - 0.5 * (1 + math.cos(math.pi * 3 / 10)) * (1 - base)  # main.py adjust_moco_momentum
    assert tau == pytest.approx(m_step**4)
    for p, old, s in zip(m.key_backbone.parameters(), before, m.backbone.parameters(), strict=True):
        four = old
        for _ in range(4):  # _update_momentum_encoder, four times with the same base weights
            four = four * m_step + s * (1 - m_step)
        torch.testing.assert_close(p, four)


def _layout(seq) -> list[str]:
    """A head as text: Linear(in,out,bias) / BN(n,affine) / ReLU / Dropout(p)."""
    out = []
    for x in seq:
        if isinstance(x, torch.nn.Linear):
            out.append(f"Linear({x.in_features},{x.out_features},{x.bias is not None})")
        elif isinstance(x, torch.nn.BatchNorm1d):
            out.append(f"BN({x.num_features},{x.affine})")
        else:
            out.append(type(x).__name__ + (f"({x.p})" if isinstance(x, torch.nn.Dropout) else ""))
    return out


def test_lodisc_code_heads_are_vits_py_no_projector_and_a_dropout_predictor():
    """builder.py's MoCo_ViT predictor (2 layers, last BN) with Dropout(0.2), and no projector:
    vits.py comments the heads out, so keys are the momentum encoder's raw CLS (width 48)."""
    m = _method()
    assert isinstance(m.projector, torch.nn.Identity) and isinstance(m.key_projector, torch.nn.Identity)
    assert _layout(m.predictor) == ["Linear(48,32,False)", "BN(32,True)", "ReLU", "Dropout(0.2)",
                                    "Linear(32,48,False)", "BN(48,False)"]  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    torch.testing.assert_close(m.key(x), m.key_backbone.pooled(x))  # the raw CLS token
    torch.testing.assert_close(m.query(x), m.predictor(m.backbone.pooled(x)))


def test_lodisc_paper_heads_add_the_mocov3_vit_projector_with_dropout():
    m = _method("lodisc.heads=paper")
    assert _layout(m.projector) == ["Linear(48,32,False)", "BN(32,True)", "ReLU", "Dropout(0.2)",
                                    "Linear(32,32,False)", "BN(32,True)", "ReLU", "Dropout(0.2)",
                                    "Linear(32,16,False)", "BN(16,False)"]  # fmt: skip
    assert _layout(m.predictor) == ["Linear(16,32,False)", "BN(32,True)", "ReLU", "Dropout(0.2)",
                                    "Linear(32,16,False)", "BN(16,False)"]  # fmt: skip
    mocov3 = build_method(load_settings("mocov3", "cpu-demo", ["model.arch=vit_micro", "model.proj_hidden=32",
                                                              "model.pred_hidden=32", "model.proj_dim=16"]))  # fmt: skip
    assert not any(isinstance(x, torch.nn.Dropout) for x in [*mocov3.projector, *mocov3.predictor])


def test_lodisc_default_ratio_is_the_recipes_and_the_caltech_overlay_keeps_0_3():
    assert load_config("lodisc")["lodisc"]["mask_ratio"] == 0.7  # builder.py keeps the top 30 %
    assert load_config("lodisc", "vit-cpu")["lodisc"]["mask_ratio"] == 0.3  # the paper's Caltech-101 r


def _slow_map(feats, labels):
    """Leave-one-out AP by the textbook definition, one query at a time."""
    f = F.normalize(feats, dim=1)
    r1, r5, aps = [], [], []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        ranked = sorted(others, key=lambda j: -float(f[i] @ f[j]))
        rel = [int(labels[j] == labels[i]) for j in ranked]
        if not sum(rel):
            continue
        r1.append(rel[0])
        r5.append(int(any(rel[:5])))
        hits, ap = 0, 0.0
        for rank, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / rank
        aps.append(ap / sum(rel))
    return 100 * np.mean(r1), 100 * np.mean(r5), 100 * np.mean(aps), len(labels) - len(aps)


def test_retrieval_on_a_hand_computed_case():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.7, 0.3], [0.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 0, 1, 0, 2])  # images 2 and 4 are alone in their class: skipped
    out = retrieval_metrics(feats, labels, chunk=2)
    # query 0 ranks 1, 2, 3, 4: relevant at 1 and 3 -> AP (1/1 + 2/3) / 2; query 1 ranks 0, 2, 3, 4:
    # the same; query 3 ranks 2, 4, 1, 0: relevant at 3 and 4 -> AP (1/3 + 2/4) / 2, Rank-1 missed
    assert out == {"queries": 3, "skipped": 2, "rank1": 66.67, "rank5": 100.0,
                   "mAP": round(100 * (5 / 6 + 5 / 6 + 5 / 12) / 3, 2)}  # fmt: skip
    assert out == retrieval_metrics(feats, labels, chunk=512)


def test_retrieval_equals_a_per_query_loop():
    g = torch.Generator().manual_seed(4)
    feats, labels = torch.randn(57, 6, generator=g), torch.randint(0, 6, (57,), generator=g)
    labels[0] = 99  # a singleton class
    out = retrieval_metrics(feats, labels, chunk=10)
    r1, r5, mean_ap, skipped = _slow_map(feats, labels)
    assert out["skipped"] == skipped == 1 and out["queries"] == 56
    assert out["rank1"] == pytest.approx(round(r1, 2)) and out["rank5"] == pytest.approx(round(r5, 2))
    assert out["mAP"] == pytest.approx(round(mean_ap, 2))


def test_lodisc_trains_and_retrieval_cli_reads_its_predictor(sample_build, tmp_path, capsys):
    from sslmask.cli import main

    run = tmp_path / "lodisc"
    args = tiny_train_args("lodisc", sample_build, run, "model.arch=vit_micro", "lodisc.mode=product",
                           "train.epochs=1")  # fmt: skip
    assert main(args) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert len(train) == 5 and all(np.isfinite(r["loss"]) and 0 <= r["fallback"] <= 1 for r in train)
    capsys.readouterr()
    for kind in ("predictor", "backbone", "gap"):
        out = tmp_path / f"{kind}.json"
        assert main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(sample_build), "--features",
                     kind, "--image-size", "48", "--workers", "0", "--out", str(out)]) == 0  # fmt: skip
        result = json.loads(out.read_text())
        assert result["features"] == kind and result["images"] == 42
        assert 0 <= result["rank1"] <= result["rank5"] <= 100 and 0 < result["mAP"] <= 100
    # ssl_compare scores LoDisc's retrieval on the predictor, as LoDisc's validate() does (issue 42
    # item 3), with the backbone's CLS retrieval beside it
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ssl_compare import RETRIEVAL_FEATURES, evaluate

    row = evaluate(str(run), "vit_micro", [str(sample_build)], [str(sample_build)], 48, 0,
                   retrieval=RETRIEVAL_FEATURES["lodisc"])  # fmt: skip
    cli = {kind: json.loads((tmp_path / f"{kind}.json").read_text()) for kind in ("predictor", "backbone")}
    assert (row["rank1"], row["mAP"]) == (cli["predictor"]["rank1"], cli["predictor"]["mAP"])
    assert (row["rank1_cls"], row["mAP_cls"]) == (cli["backbone"]["rank1"], cli["backbone"]["mAP"])
    capsys.readouterr()
    assert main(["eval", "retrieval", "--checkpoint", "random", "--arch", "vit_micro", "--data", str(sample_build),
                 "--features", "predictor", "--image-size", "48", "--workers", "0"]) != 0  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--features predictor needs an sslmask run" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["lodisc.mode=random"], "lodisc.mode='random': must be one of attention, saliency, product"),
        (["lodisc.mask_ratio=1.0"], "lodisc.mask_ratio=1.0: must be in [0, 1)"),
        (["model.arch=resnet_tiny"], "lodisc needs a ViT backbone"),
    ],
)
def test_bad_lodisc_values_are_one_clear_line(sets, message, tmp_path, sample_build, capsys):
    assert message in refused_train(
        "lodisc", sample_build, tmp_path / "r", ["model.arch=vit_micro", *sets], capsys
    )
