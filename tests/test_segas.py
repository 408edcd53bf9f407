"""SegAS, against slow computations written here (docs/methods.md §4 and §6)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import refused_train, tiny_train_args

from sslmask.config import load_settings
from sslmask.losses import calibrated_target, confidence, procr_loss
from sslmask.methods import build_method
from sslmask.methods.segas import apfs_keep, random_cells_keep
from sslmask.pooling import channel_heatmap
from sslmask.progress import Progress
from sslmask.prototypes import hierarchical_kmeans, prototype_sizes

SMALL = ["model.arch=resnet_tiny", "model.proj_hidden=32", "model.proj_dim=16", "mocov2.queue=32",
         "data.image_size=32"]  # fmt: skip


def _method(*sets: str):
    cfg = load_settings("segas", "cpu-demo", [*SMALL, *sets])
    torch.manual_seed(0)
    return build_method(cfg)


def _slow_confidence(p: list[float]) -> float:
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return max(p) * (1 - entropy / math.log(len(p)))


def _slow_target(sims: list[float], label: int, tau_k: float, tau_rho: float, mu: float) -> list[float]:
    """Eqs. 6-9 for one sample, in plain Python."""
    s_re = [-1.0 if s < mu else s for s in sims]
    z = sum(math.exp(s / tau_k) for s in s_re)
    p = [math.exp(s / tau_k) / z for s in s_re]
    rho = _slow_confidence(p)
    y = [1.0 if c == label else 0.0 for c in range(len(sims))]
    return y if rho < tau_rho else [rho * pc + (1 - rho) * yc for pc, yc in zip(p, y, strict=True)]


def test_confidence_is_max_times_one_minus_normalised_entropy():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 7, generator=g) * 3, 1)
    p[0] = F.one_hot(torch.tensor(2), 7).float()  # certain: rho = 1
    p[1] = torch.full((7,), 1 / 7)  # uniform: rho = 0
    got = confidence(p)
    for i in range(6):
        assert float(got[i]) == pytest.approx(_slow_confidence(p[i].tolist()), abs=1e-6)
    assert float(got[0]) == pytest.approx(1.0) and float(got[1]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mu_mode", ["mean", "sample_max", "prototype_max", "max"])
@pytest.mark.parametrize("tau_rho", [0.0, 0.2, 1.0])
def test_calibrated_target_matches_a_per_sample_loop(mu_mode, tau_rho):
    g = torch.Generator().manual_seed(1)
    sim = (
        F.normalize(torch.randn(8, 16, generator=g), dim=1)
        @ F.normalize(torch.randn(5, 16, generator=g), dim=1).T
    )
    sim[0] = torch.tensor([0.9, 0.1, 0.0, -0.2, 0.05])  # one confident sample
    label = torch.randint(0, 5, (8,), generator=g)
    got = calibrated_target(sim, label, 0.1, tau_rho, mu_mode)
    rows = sim.tolist()
    batch_mu = {
        "sample_max": sum(max(row) for row in rows) / 8,  # each sample's best prototype, averaged
        "max": sum(max(row) for row in rows) / 8,
        "prototype_max": sum(max(row[c] for row in rows) for c in range(5)) / 5,  # Eq. 6 as printed
    }
    for i in range(8):
        mu = sum(rows[i]) / 5 if mu_mode == "mean" else batch_mu[mu_mode]
        want = _slow_target(sim[i].tolist(), int(label[i]), 0.1, tau_rho, mu)
        assert got[i].tolist() == pytest.approx(want, abs=1e-6)
        assert float(got[i].sum()) == pytest.approx(1.0, abs=1e-6)
    if tau_rho == 1.0:  # rho < 1 always: the k-means labels alone
        assert torch.equal(got, F.one_hot(label, 5).float())


def test_procr_loss_is_the_kl_divergence_of_the_query_from_the_target():
    g = torch.Generator().manual_seed(2)
    target = torch.softmax(torch.randn(4, 6, generator=g), 1)
    target[1] = F.one_hot(torch.tensor(3), 6).float()  # 0 log 0 = 0
    logits = torch.randn(4, 6, generator=g)
    got = procr_loss(target, logits)
    for i in range(4):
        q = torch.softmax(logits[i].double(), 0).tolist()
        want = sum(t * math.log(t / qc) for t, qc in zip(target[i].tolist(), q, strict=True) if t > 0)
        assert float(got[i]) == pytest.approx(want, rel=1e-5)


def test_prototype_sizes_auto_scales_imagenet_and_explicit_lists_are_checked():
    assert prototype_sizes(None, 1_281_167) == [30_000, 10_000, 1_000]
    assert prototype_sizes(None, 2600) == [61, 20, 2]
    assert prototype_sizes([10, 4], 50) == [10, 4]
    for bad in ([60], [10, 20], [1]):
        with pytest.raises(ValueError, match="segas.prototypes"):
            prototype_sizes(bad, 50)


def test_hierarchical_kmeans_labels_are_consistent_across_levels_and_find_the_blobs():
    rng = np.random.default_rng(0)
    # 2 super-groups of 3 tight blobs each on the sphere: level 1 (6) finds the blobs, level 2 the groups
    axes = np.eye(16, dtype=np.float32)
    centres = [axes[0] + 0.3 * axes[1 + b] for b in range(3)] + [
        axes[8] + 0.3 * axes[9 + b] for b in range(3)
    ]
    x = np.concatenate([c + 0.02 * rng.standard_normal((40, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blob = np.repeat(np.arange(6), 40)
    cents, labels = hierarchical_kmeans(x, [6, 2], niter=20, nredo=3, seed=0)
    assert [c.shape for c in cents] == [(6, 16), (2, 16)]
    assert all(np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5) for c in cents)
    # level 1: each blob is one cluster; level 2: each super-group one
    assert len({(b, lab) for b, lab in zip(blob, labels[0], strict=True)}) == 6
    assert len({(b // 3, lab) for b, lab in zip(blob, labels[1], strict=True)}) == 2
    # consistency: an instance's level-2 label is the level-2 cluster of its level-1 centroid
    up = np.argmax(cents[0] @ cents[1].T, axis=1)
    assert np.array_equal(labels[1], up[labels[0]])
    # and level-1 labels are the nearest level-1 centroid
    assert np.array_equal(labels[0], np.argmax(x @ cents[0].T, axis=1))


def test_channel_heatmap_and_apfs_follow_the_formulas():
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(2, 5, 3, 3, generator=g)
    heat = channel_heatmap(grid, (12, 12))
    for i in range(2):
        mean = grid[i].mean(0)[None, None]
        up = F.interpolate(mean, size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
        want = (up - up.min()) / (up.max() - up.min())
        torch.testing.assert_close(heat[i, 0], want, rtol=1e-5, atol=1e-6)
    keep = apfs_keep(heat, 10.0, 0.5)
    a = heat.double()
    torch.testing.assert_close(keep.double(), 1 - 1 / (1 + torch.exp(-10 * (a - 0.5))), rtol=1e-5, atol=1e-6)


def test_random_cells_zero_exactly_n_allowed_cells():
    g = torch.Generator().manual_seed(4)
    allowed = torch.zeros(3, 4, 4, dtype=torch.bool)
    allowed[0] = True
    allowed[1, :2, :2] = True  # 4 cells
    allowed[2, 0, 0] = True  # fewer allowed than asked: all of them
    keep = random_cells_keep(torch.tensor([5, 3, 2]), allowed, (16, 16), g)
    assert keep.shape == (3, 1, 16, 16)
    cells = keep[:, 0, ::4, ::4] == 0  # one pixel per 4 x 4 cell
    assert cells.flatten(1).sum(1).tolist() == [5, 3, 1]
    assert not (cells & ~allowed).any()
    assert torch.equal(keep, F.interpolate(keep[:, :, ::4, ::4], size=(16, 16), mode="nearest"))


def _fit_prototypes(m, levels=(6, 3), n=40, dim=16):
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=1).numpy()
    cents, labels = hierarchical_kmeans(x, list(levels), niter=5, nredo=1)
    m.prototypes = [torch.from_numpy(c) for c in cents]
    m.instance_labels = torch.from_numpy(np.stack(labels))


def _batch(b=6, size=32, seed=6):
    g = torch.Generator().manual_seed(seed)
    batch = {f"view{v}": torch.randn(b, 3, size, size, generator=g) for v in range(3)}
    batch["index"] = torch.arange(b) * 3
    return batch


@pytest.mark.parametrize("mu_mode", ["max", "mean"])
def test_forward_equals_a_per_sample_reference(monkeypatch, mu_mode):
    m = _method("segas.diversity_on=all", f"segas.mu={mu_mode}").eval()  # eval: BatchNorm is per sample
    _fit_prototypes(m)
    batch = _batch()
    x2 = batch["view2"] * 0.5
    fired = torch.tensor([True, False, True, True, False, False])
    monkeypatch.setattr(m, "filtered_view", lambda b, p, step: (x2, fired, {}))
    out = m(batch, Progress(0, 10, 10))
    s, tau = m.settings.to_config()["segas"], m.settings.to_config()["mocov2"]["temperature"]
    total = 0.0
    terms = {"info": 0.0, "h1": 0.0, "h2": 0.0, "div": 0.0}
    with torch.no_grad():
        keys = [F.normalize(m.key_projector(m.key_backbone.pooled(batch["view1"][i : i + 1])), dim=1)[0]
                for i in range(6)]  # fmt: skip
        # Eq. 6 as printed: the batch mean over the B_U samples of each one's best prototype match
        batch_mu = [sum(max(float(k @ p) for p in c) for k in keys) / 6 for c in m.prototypes]
        for i in range(6):
            q1, q2 = m.query(batch["view0"][i : i + 1])[0], m.query(x2[i : i + 1])[0]
            k = F.normalize(m.key_projector(m.key_backbone.pooled(batch["view1"][i : i + 1])), dim=1)[0]
            logits = [float(q1 @ k)] + [float(q1 @ n) for n in m.queue]
            terms["info"] += -math.log(math.exp(logits[0] / tau) / sum(math.exp(v / tau) for v in logits)) / 6
            per_level = {"h1": [], "h2": []}
            first = None
            for level, c in enumerate(m.prototypes):
                sims = [float(k @ p) for p in c]
                label = int(m.instance_labels[level, int(batch["index"][i])])
                mu = batch_mu[level] if mu_mode == "max" else sum(sims) / len(sims)
                target = _slow_target(sims, label, s["tau_key"], s["tau_rho"], mu)
                for name, q in (("h1", q1), ("h2", q2)):
                    z = [math.exp(float(q @ p) / s["tau_query"]) for p in c]
                    p = [v / sum(z) for v in z]
                    per_level[name].append(
                        sum(t * math.log(t / pc) for t, pc in zip(target, p, strict=True) if t > 0)
                    )
                    if level == 0:
                        first = (target, first[1] if first else {}) if name == "h1" else first
                        first[1][name] = p
            for name in ("h1", "h2"):
                terms[name] += sum(per_level[name]) / len(per_level[name]) / 6
            target, probs = first
            c = max(range(len(target)), key=lambda j: target[j])
            terms["div"] += (max(0.0, probs["h2"][c] - probs["h1"][c] + s["margin"]) + float(q1 @ q2)) / 6
    total = (
        terms["info"] + s["alpha"] * terms["h1"] + s["beta"] * terms["h2"] + s["lambda_diver"] * terms["div"]
    )
    assert float(out["loss_info"]) == pytest.approx(terms["info"], rel=1e-4)
    assert float(out["loss_hprocr1"]) == pytest.approx(terms["h1"], rel=1e-4)
    assert float(out["loss_hprocr2"]) == pytest.approx(terms["h2"], rel=1e-4)
    assert float(out["loss_diver"]) == pytest.approx(terms["div"], rel=1e-4)
    assert float(out["loss"]) == pytest.approx(total, rel=1e-4)


def test_diversity_on_filtered_averages_over_the_filtered_samples_only():
    m = _method()
    g = torch.Generator().manual_seed(7)
    target = torch.softmax(torch.randn(4, 5, generator=g), 1)
    l1, l2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    q1, q2 = (
        F.normalize(torch.randn(4, 8, generator=g), dim=1),
        F.normalize(torch.randn(4, 8, generator=g), dim=1),
    )
    fired = torch.tensor([True, False, False, True])
    m.segas = replace(m.segas, diversity_on="all")
    each = [float(m.diversity(target[i : i + 1], l1[i : i + 1], l2[i : i + 1], q1[i : i + 1], q2[i : i + 1],
                              fired[i : i + 1])) for i in range(4)]  # fmt: skip
    m.segas = replace(m.segas, diversity_on="filtered")
    assert float(m.diversity(target, l1, l2, q1, q2, fired)) == pytest.approx(
        (each[0] + each[3]) / 2, rel=1e-5
    )
    assert float(m.diversity(target, l1, l2, q1, q2, torch.zeros(4, dtype=torch.bool))) == 0.0


def test_before_warmup_the_loss_is_moco_v2s():
    m = _method()
    out = m(_batch(), Progress(0, 10, 10))
    assert float(out["loss"]) == pytest.approx(float(out["loss_info"]))
    assert "loss_hprocr1" not in out


def test_the_trigger_fires_with_the_query_confidence_and_half_of_it_is_apfs():
    m = _method()
    b = 64
    batch = _batch(b=b)
    p = torch.full((b, 4), 0.1)
    p[:, 0] = 0.7  # rho = 0.7 (1 - H/log 4)
    rho = float(confidence(p)[0])
    fired = apfs = 0
    steps = 40
    for step in range(steps):
        _, fire, info = m.filtered_view(batch, p, Progress(step, 10, 10))
        fired += int(fire.sum())
        apfs += float(info["apfs"]) * b
    n = steps * b
    sd = math.sqrt(n * rho * (1 - rho))
    assert abs(fired - n * rho) < 4 * sd
    assert abs(apfs - fired / 2) < 4 * math.sqrt(fired / 4)
    # the coins depend on (seed, step) only: the same step draws the same samples
    assert torch.equal(
        m.filtered_view(batch, p, Progress(3, 10, 10))[1], m.filtered_view(batch, p, Progress(3, 10, 10))[1]
    )


def test_filtering_applies_apfs_or_random_cells_to_the_fired_samples():
    m = _method()
    batch = _batch(b=16)
    p = torch.zeros(16, 4)
    p[:, 0] = 1.0  # rho = 1: every sample fires
    x2, fire, info = m.filtered_view(batch, p, Progress(0, 10, 10))
    assert fire.all() and float(info["filtered"]) == 1.0
    with torch.no_grad():
        heat = channel_heatmap(m.key_backbone(batch["view2"]), (32, 32))
    soft = apfs_keep(heat, m.segas.omega, m.segas.sigma)
    x = batch["view2"]
    is_apfs = [torch.allclose(x2[i], x[i] * soft[i], atol=1e-6) for i in range(16)]
    for i in range(16):
        if not is_apfs[i]:  # random filtering: whole cells zeroed, the rest untouched
            kept = (x2[i] == x[i]).all(0)
            assert ((x2[i] == 0).all(0) | kept).all() and not kept.all()
    assert sum(is_apfs) == round(float(info["apfs"]) * 16)


def _masked_method():
    m = _method("segas.mask_mode=salient")
    assert type(m).uses_masks(m.settings)
    return m


def test_salient_filtering_only_erases_inside_the_mask():
    m = _masked_method()
    batch = _batch(b=8)
    mask = torch.zeros(8, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1.0  # a centred square object, 25 % of the view
    mask[7] = 0.0  # an empty mask: plain SegAS filtering
    batch["mask2"] = mask
    p = torch.zeros(8, 4)
    p[:, 0] = 1.0
    x2, _, info = m.filtered_view(batch, p, Progress(1, 10, 10))
    assert float(info["fallback"]) == pytest.approx(1 / 8)
    changed = (x2 != batch["view2"]).any(1)  # 8 x 32 x 32
    outside = mask[:, 0] == 0
    for i in range(7):
        diff = (x2[i] - batch["view2"][i]).abs().amax(0)
        # ApFS outside the object keeps 1 - sigmoid(-omega sigma) of each pixel: a change < 1 %
        assert (
            float((diff[outside[i]] / batch["view2"][i].abs().amax(0)[outside[i]].clamp_min(1e-6)).max())
            < 0.01
        )
        assert changed[i][~outside[i]].any()


def test_the_guard_halves_the_filtered_area_when_little_foreground_would_remain():
    m = _masked_method()
    m.segas = replace(m.segas, apfs_prob=0.0, random_grid=4)  # random cells: areas are counts of cells
    size, b = 32, 4
    heat = torch.zeros(b, 1, size, size)
    heat[:, :, :16, :] = 1.0  # {A > sigma}: the top half, 8 of 16 cells at a 4 x 4 grid
    mask = torch.zeros(b, 1, size, size)
    mask[:1, :, :, :] = 1.0  # sample 0: a full-view object (fallback: not salient)
    mask[1, :, :16, :16] = 1.0  # sample 1: 4 cells of object; 8 to erase would leave nothing
    mask[2:, :, :, :] = 1.0
    mask[2, :, :, 24:] = 0.0  # sample 2: 12 object cells; erasing 8 leaves 1/3 > 0.2: no guard
    salient = torch.tensor([False, True, True, False])
    keep = m.filter_weights(heat, mask, salient, torch.zeros(b, dtype=torch.bool), torch.Generator())
    erased = (keep[:, 0, ::8, ::8] == 0).flatten(1).sum(1).tolist()
    assert erased[0] == 8 and erased[3] == 8  # plain: the area of {A > sigma}
    assert (
        erased[1] == 4
    )  # guard: 8 -> 4 (all 4 object cells; no foreground remains, but the area halves once)
    assert erased[2] == 8


def test_refused_segas_values_give_one_line(sample_build, tmp_path, capsys):
    for item, text in [("segas.mask_mode=edges", "segas.mask_mode"), ("segas.tau_key=0", "segas.tau_key"),
                       ("segas.prototypes=[]", "segas.prototypes"), ("segas.sigma=1.5", "segas.sigma=1.5: must be in (0, 1)"),
                       # issue 35: refused at the start, not at the first re-clustering epochs later
                       ("segas.prototypes=[0]", "segas.prototypes=[0]: must be >= 1"), ("segas.prototypes=[100000]", "clusters here")]:  # fmt: skip
        err = refused_train("segas", sample_build, tmp_path / "run", [item], capsys)
        assert text in err, err


def test_foreground_embedding_is_the_masked_average_of_the_key_grid():
    m = _method("segas.cluster_on=foreground").eval()
    assert type(m).uses_masks(m.settings)
    x = _batch(b=3)["view0"]
    mask = torch.zeros(3, 1, 32, 32)
    mask[0, :, :16, :16] = 1  # one cell of the 2 x 2 grid
    mask[1] = 1  # full: GAP
    got = m.embed_foreground(x, mask)  # sample 2: empty, GAP
    with torch.no_grad():
        grid = m.key_backbone(x)
        pooled = torch.stack([grid[0, :, 0, 0], grid[1].mean((1, 2)), grid[2].mean((1, 2))])
        torch.testing.assert_close(got, F.normalize(m.key_projector(pooled), dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["salient", "foreground_clusters"])
def test_segas_trains_on_a_build_reclusters_each_epoch_and_logs_its_terms(mode, sample_build, tmp_path):
    from sslmask.checkpoint import load_backbone
    from sslmask.cli import main

    run = tmp_path / "run"
    args = tiny_train_args("segas", sample_build, run, "mocov2.queue=32", "segas.warmup_epochs=1",
                           "segas.prototypes=[6, 3]", "train.epochs=3")  # fmt: skip
    args += (
        ["--set", "segas.mask_mode=salient"]
        if mode == "salient"
        else ["--set", "segas.cluster_on=foreground"]
    )
    assert main(args) == 0
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["clusters_l1"] == 6 for r in epochs)
    train = [r for r in lines if r["kind"] == "train"]
    assert "loss_hprocr1" not in train[0]  # warm-up: MoCo v2
    after = [r for r in train if r["epoch"] >= 1]
    for r in after:
        want = r["loss_info"] + 0.5 * (r["loss_hprocr1"] + r["loss_hprocr2"]) + 0.1 * r["loss_diver"]
        assert r["loss"] == pytest.approx(want, rel=1e-4)
        assert 0 <= r["filtered"] <= 1 and 0 <= r.get("fallback", 0) <= 1
    state = torch.load(run / "checkpoint.pt", weights_only=True)["method"]["_extra_state"]
    assert state["epoch"] == 2 and [tuple(c.shape) for c in state["prototypes"]] == [(6, 16), (3, 16)]
    assert state["labels"].shape == (2, lines[0]["samples"])
    assert load_backbone(str(run), None) is not None  # evaluation reads the trunk past the clusters
