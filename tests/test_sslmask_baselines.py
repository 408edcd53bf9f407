"""DINO, MoCo v2 and MoCo v3: each loss against a slow, independent computation, and the
pieces around it (queue, centre, temperature, frozen prototypes, views)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslmask.config import load_settings
from sslmask.losses import dino_loss, info_nce, moco_v3_loss
from sslmask.methods import build_method
from sslmask.progress import Progress

SMALL = ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16", "data.image_size=32"]


def _unit(rows):
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_info_nce_with_a_queue_equals_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 6, generator=g), dim=1) for n in (4, 4, 9))
    tau = 0.2
    expected = []
    for qi, ki in zip(q.tolist(), k.tolist(), strict=True):
        logits = [_dot(qi, ki) / tau] + [_dot(qi, n) / tau for n in queue.tolist()]
        expected.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    torch.testing.assert_close(info_nce(q, k, queue, tau), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_moco_v3_loss_with_gathered_keys_and_the_2tau_scale_equals_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)  # keys of 2 processes
    tau, offset = 0.2, 3  # this is rank 1: its queries match keys 3, 4, 5
    qn, kn = _unit(q.tolist()), _unit(keys.tolist())
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [_dot(qi, kj) / tau for kj in kn]
        total += -logits[offset + i] + math.log(sum(math.exp(x) for x in logits))
    expected = total / len(qn) * 2 * tau
    assert moco_v3_loss(q, keys, tau, offset).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_over_all_crop_pairs_but_same_view_equals_a_slow_loop():
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(2, 5, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(2, 5, generator=g) for _ in range(2)]
    center, t_temp, s_temp = torch.randn(1, 5, generator=g), 0.04, 0.1
    targets = [F.softmax((t - center) / t_temp, dim=-1) for t in teacher]
    terms = []
    for iq in range(2):
        for v in range(4):
            if v == iq:
                continue
            per_sample = []
            for b in range(2):
                s = [x / s_temp for x in student[v][b].tolist()]
                log_z = math.log(sum(math.exp(x) for x in s))
                per_sample.append(
                    -sum(p * (x - log_z) for p, x in zip(targets[iq][b].tolist(), s, strict=True))
                )
            terms.append(sum(per_sample) / 2)
    assert len(terms) == 6
    assert dino_loss(student, targets, s_temp).item() == pytest.approx(sum(terms) / 6, rel=1e-5)


def _method(name: str, *sets: str):
    cfg = load_settings(name, "cpu-demo", [*SMALL, *sets])
    torch.manual_seed(0)
    return build_method(cfg), cfg


def test_moco_v2_queue_wraps_around_and_keeps_the_newest_keys():
    method, _ = _method("mocov2", "mocov2.queue=5")
    keys = torch.arange(3 * 16, dtype=torch.float32).view(3, 16)
    method.enqueue(keys)
    method.enqueue(keys + 100)
    assert int(method.queue_ptr) == 1
    torch.testing.assert_close(method.queue[[3, 4, 0]], keys + 100)  # wrapped
    torch.testing.assert_close(method.queue[[1, 2]], keys[1:])
    method.enqueue(torch.ones(7, 16))  # more keys than the queue holds
    assert bool((method.queue == 1).all())


def test_moco_v2_step_enqueues_its_keys_and_updates_the_key_encoder_at_0_999():
    method, cfg = _method("mocov2", "mocov2.queue=8", "ema.tau_base=0.999")
    batch = {f"view{v}": torch.randn(4, 3, 32, 32) for v in range(2)}
    before = method.key_projector[0].weight.clone()
    out = method(batch, Progress(0, 10, 10))
    out["loss"].backward()
    with torch.no_grad():
        method.projector[0].weight.add_(1.0)  # what an optimiser step would do
    assert method.after_optimizer_step(Progress(0, 10, 10)) == {"tau": 0.999}
    torch.testing.assert_close(method.key_projector[0].weight, before + 0.001)
    assert int(method.queue_ptr) == 4 and method.queue[:4].norm(dim=1).allclose(torch.ones(4))
    assert [v.scale for v in type(method).view_specs(cfg)] == [(0.2, 1.0)] * 2


def test_dino_head_prototypes_have_unit_norm_and_stay_frozen_in_the_first_epoch():
    method, cfg = _method(
        "dino", "dino.out_dim=12", "dino.local_crops=2", "dino.local_size=16", "train.epochs=4"
    )
    last = method.head.last_layer
    torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(12))
    assert not last.parametrizations.weight.original0.requires_grad  # the norm stays 1
    views = type(method).view_specs(cfg)
    assert [v.size for v in views] == [32, 32, 16, 16] and views[2].scale == (0.05, 0.14)
    batch = {f"view{v}": torch.randn(2, 3, s.size, s.size) for v, s in enumerate(views)}
    method(batch, Progress(0, 40, 10))["loss"].backward()
    method.before_optimizer_step(Progress(9, 40, 10))  # epoch 0 of 4: frozen
    assert all(p.grad is None for p in last.parameters())
    method(batch, Progress(10, 40, 10))["loss"].backward()
    method.before_optimizer_step(Progress(10, 40, 10))  # epoch 1: trains
    assert last.parametrizations.weight.original1.grad is not None


def test_dino_centre_and_teacher_temperature():
    method, cfg = _method("dino", "dino.out_dim=12", "dino.local_crops=0", "train.epochs=10",
                          "dino.warmup_teacher_temp_epochs=5")  # fmt: skip
    # main_dino.py: np.concatenate((np.linspace(0.04, 0.07, W), ones * 0.07))[epoch]: the same at
    # every epoch's start (issue 42 item 8: here it reached 0.07 one epoch late)
    reference = np.concatenate((np.linspace(0.04, 0.07, 5), np.full(5, 0.07)))
    for epoch in range(10):
        assert method.teacher_temp(Progress(epoch * 10, 100, 10)) == pytest.approx(reference[epoch])
    assert method.teacher_temp(Progress(25, 100, 10)) == pytest.approx(0.04 + 0.03 * 25 / 40)
    one, _ = _method("dino", "dino.out_dim=12", "dino.local_crops=0", "dino.warmup_teacher_temp_epochs=1")
    assert [one.teacher_temp(Progress(s, 100, 10)) for s in (0, 9, 10)] == pytest.approx([0.04, 0.04, 0.07])
    batch = {f"view{v}": torch.randn(3, 3, 32, 32) for v in range(2)}
    method(batch, Progress(0, 100, 10))
    with torch.no_grad():  # the teacher sees both global crops as one batch, as in forward
        teacher = method.teacher_head(
            method.teacher_backbone(torch.cat([batch["view0"], batch["view1"]])).mean(dim=(2, 3))
        )
    method.after_optimizer_step(Progress(0, 100, 10))
    expected = 0.1 * teacher.mean(0, keepdim=True)  # from a zero centre, momentum 0.9
    torch.testing.assert_close(method.center, expected, rtol=1e-4, atol=1e-6)


def test_moco_v3_views_are_byols_pair_and_the_key_encoder_has_no_predictor():
    method, cfg = _method("mocov3")
    views = type(method).view_specs(cfg)
    assert [v.blur_p for v in views] == [1.0, 0.1] and [v.solarize_p for v in views] == [0.0, 0.2]
    assert not hasattr(method, "key_predictor")
    assert all(not p.requires_grad for p in method.key_backbone.parameters())
    assert method.after_optimizer_step(Progress(0, 10, 10))["tau"] == pytest.approx(0.99)


def _torchrun(name: str, out):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    res = subprocess.run([*torchrun, str(repo / "tests" / "ddp_baselines_worker.py"), name, str(out)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _assert_grads(method, ddp):
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-6 + 1e-4 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def _embed(backbone, head, x):
    return head(backbone(x).mean(dim=(2, 3)))


@pytest.mark.slow
def test_moco_v2_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    """2 DDP processes (gloo) against one process doing both halves: shuffled BatchNorm for the
    keys (the same permutation of the global key batch), the same queue of negatives, and the
    queue afterwards holding both processes' keys in rank order."""
    from ddp_baselines_worker import make
    from ddp_reference import global_batch

    from sslmask.methods.mocov2 import shuffle_perm

    ddp = _torchrun("mocov2", tmp_path / "ddp.pt")
    method = make("mocov2")
    batch = global_batch()
    queue = method.queue.clone()
    perm = shuffle_perm(8, method.settings.train.seed, 3, torch.device("cpu"))
    with torch.no_grad():
        shuffled = batch["view1"][perm]
        k = torch.cat([F.normalize(_embed(method.key_backbone, method.key_projector, shuffled[i * 4 : (i + 1) * 4]), dim=1)
                       for i in range(2)])  # fmt: skip
        keys = torch.empty_like(k)
        keys[perm] = k
    loss = 0.0
    for r in range(2):
        q = F.normalize(_embed(method.backbone, method.projector, batch["view0"][r * 4 : (r + 1) * 4]), dim=1)
        loss = loss + info_nce(q, keys[r * 4 : (r + 1) * 4], queue, 0.2).mean() / 2
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads(method, ddp)
    torch.testing.assert_close(ddp["queue"][:8], keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["queue"][8:], queue[8:])

    # issue 42 item 7: one process emulating two (mocov2.shuffle_bn_batch=4 on the batch of 8)
    # is the two real processes: the same loss, gradients and queue, in one forward
    from ddp_baselines_worker import SETS

    torch.manual_seed(0)
    emulated = build_method(load_settings("mocov2", "cpu-demo", [*SETS, "mocov2.shuffle_bn_batch=4"]))
    progress = Progress(3, 10, 10, emulated.settings.train.seed, 0)
    out = emulated({k: v for k, v in batch.items() if k.startswith("view")}, progress)
    out["loss"].backward()
    emulated.after_optimizer_step(progress)
    torch.testing.assert_close(ddp["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
    _assert_grads(emulated, ddp)
    torch.testing.assert_close(ddp["queue"], emulated.queue, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_moco_v3_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    """Each process's queries against the keys of both (gathered), with its own offset."""
    from ddp_baselines_worker import make
    from ddp_reference import global_batch

    ddp = _torchrun("mocov3", tmp_path / "ddp.pt")
    method = make("mocov3")
    batch = global_batch()
    tau = method.mocov3.temperature
    halves = [{k: v[r * 4 : (r + 1) * 4] for k, v in batch.items()} for r in range(2)]
    with torch.no_grad():
        keys = [torch.cat([_embed(method.key_backbone, method.key_projector, h[f"view{v}"]) for h in halves])
                for v in range(2)]  # fmt: skip
    loss = 0.0
    for r, h in enumerate(halves):
        q = [method.predictor(_embed(method.backbone, method.projector, h[f"view{v}"])) for v in range(2)]
        loss = loss + (moco_v3_loss(q[0], keys[1], tau, 4 * r) + moco_v3_loss(q[1], keys[0], tau, 4 * r)) / 2
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads(method, ddp)
