"""What the reference codes train and score (docs/methods.md §0, §5), each checked against a
description written out here: head layouts layer by layer, clipping by hand, the decay rules of
each method, which trunk an evaluation reads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sslmask.checkpoint import (
    CheckpointError,
    backbone_state,
    load_backbone_branch,
    resolve_branch,
    save_atomic,
)
from sslmask.config import load_config, load_settings
from sslmask.engine import decay_exclude
from sslmask.methods import build_method
from sslmask.optim import clip_gradients
from sslmask.progress import Progress

TINY = ["model.proj_hidden=32", "model.pred_hidden=24", "model.proj_dim=16"]


def _method(name: str, *sets: str, config: str = "cpu-demo"):
    torch.manual_seed(0)
    return build_method(load_settings(name, config, [*TINY, *sets]))


def _layout(seq: nn.Sequential) -> list[str]:
    out = []
    for x in seq:
        if isinstance(x, nn.Linear):
            out.append(f"Linear({x.in_features},{x.out_features},{x.bias is not None})")
        elif isinstance(x, nn.BatchNorm1d):
            out.append(f"BN({x.num_features},{x.affine})")
        else:
            out.append(type(x).__name__)
    return out


# ---- MoCo v3 heads: builder.py's MoCo_ResNet and MoCo_ViT ------------------------------------


def test_mocov3_resnet_heads_are_moco_resnets_two_and_two_without_the_predictors_last_bn():
    m = _method("mocov3")  # resnet_tiny: 128 features
    assert _layout(m.projector) == ["Linear(128,32,False)", "BN(32,True)", "ReLU", "Linear(32,16,False)",
                                    "BN(16,False)"]  # fmt: skip
    assert _layout(m.predictor) == ["Linear(16,24,False)", "BN(24,True)", "ReLU", "Linear(24,16,False)"]
    assert _layout(m.key_projector) == _layout(m.projector)
    # parameters by hand: 128*32 + 2*32 + 32*16 (the last BN has none); 16*24 + 2*24 + 24*16
    assert sum(p.numel() for p in m.projector.parameters()) == 128 * 32 + 64 + 32 * 16
    assert sum(p.numel() for p in m.predictor.parameters()) == 16 * 24 + 48 + 24 * 16


def test_mocov3_vit_heads_are_moco_vits_three_and_two_both_ending_in_bn():
    m = _method("mocov3", "model.arch=vit_micro")  # CLS width 48
    assert _layout(m.projector) == ["Linear(48,32,False)", "BN(32,True)", "ReLU", "Linear(32,32,False)",
                                    "BN(32,True)", "ReLU", "Linear(32,16,False)", "BN(16,False)"]  # fmt: skip
    assert _layout(m.predictor) == ["Linear(16,24,False)", "BN(24,True)", "ReLU", "Linear(24,16,False)",
                                    "BN(16,False)"]  # fmt: skip


def test_stop_grad_conv1_freezes_the_vit_patch_embedding_only():
    m = _method("mocov3", "model.arch=vit_micro")
    frozen = {n for n, p in m.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed.proj.weight", "patch_embed.proj.bias"}  # vits.py's two tensors
    in_optimiser = {id(p) for g in m.param_groups(0.1, "none") for p in g["params"]}
    assert not {id(p) for n, p in m.backbone.named_parameters() if n in frozen} & in_optimiser
    before = m.backbone.patch_embed.proj.weight.clone()
    opt = torch.optim.AdamW([p for g in m.param_groups(0.1, "none") for p in g["params"]], lr=0.1)
    out = m({"view0": torch.randn(4, 3, 32, 32), "view1": torch.randn(4, 3, 32, 32)}, Progress(0, 10, 10))
    out["loss"].backward()
    opt.step()
    m.after_optimizer_step(Progress(0, 10, 10))
    assert torch.equal(m.backbone.patch_embed.proj.weight, before)
    torch.testing.assert_close(m.key_backbone.patch_embed.proj.weight, before)  # the EMA of a constant
    unfrozen = _method("mocov3", "model.arch=vit_micro", "mocov3.stop_grad_conv1=false")
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())
    resnet = _method("mocov3")  # the flag is a ViT recipe's: a ResNet trains conv1
    assert resnet.backbone.conv1.weight.requires_grad


def test_mocov3_resnets_start_with_zero_init_residual_blocks():
    """Issue 42 item 8: main_moco.py builds its ResNets with zero_init_residual=True (every
    block's last BN gamma 0); the other methods' references use torchvision's default."""
    m = _method("mocov3")
    gammas = [b.bn2.weight for layer in (m.backbone.layer1, m.backbone.layer4) for b in layer]
    assert all(torch.count_nonzero(g) == 0 for g in gammas)
    assert torch.equal(m.key_backbone.layer1[0].bn2.weight, m.backbone.layer1[0].bn2.weight)
    assert torch.count_nonzero(m.backbone.bn1.weight) > 0  # the stem's BN is not a block's last
    byol = _method("byol")
    assert torch.count_nonzero(byol.backbone.layer1[0].bn2.weight) > 0


def test_lodisc_trains_its_patch_embedding():
    """Issue 42 item 1: LoDisc's builder.py builds its own ViT (vit_b_16), which main.py's
    stop-grad partial never reaches, so the reference trains the patch embedding."""
    m = _method("lodisc", "model.arch=vit_micro")
    assert all(p.requires_grad for p in m.backbone.parameters())
    assert load_config("lodisc")["mocov3"]["stop_grad_conv1"] is False
    assert load_config("mocov3")["mocov3"]["stop_grad_conv1"] is True  # MoCo v3's own recipe keeps it


# ---- optimiser: weight-decay rules and clipping -------------------------------------------


@pytest.mark.parametrize(
    ("method", "sets", "rule"),
    [
        ("byol", [], "bias_norm"),  # BYOL: biases and BN out of wd and LARS
        ("harl", [], "bias_norm"),
        ("dino", [], "bias_norm"),  # get_params_groups: .bias or 1-D
        ("scfs", [], "bias_norm"),
        ("mocov2", [], "none"),  # SGD(model.parameters(), weight_decay=1e-4)
        ("segas", [], "none"),  # HCSC, the same
        ("mocov3", [], "bias_norm"),  # the ResNet recipe's LARS skips 1-D tensors
        ("mocov3", ["model.arch=vit_micro"], "none"),  # the ViT recipe's AdamW decays everything
        ("lodisc", ["model.arch=vit_micro"], "none"),
    ],
)
def test_auto_weight_decay_rule_is_each_references(method, sets, rule):
    m = _method(method, *sets)
    assert m.settings.optim.decay_exclude == "auto"
    assert decay_exclude(m, m.settings) == rule
    decayed, rest = m.param_groups(1e-4, rule)
    one_d = [p for mod in m.online_modules() for p in mod.parameters() if p.requires_grad and p.ndim <= 1]
    assert len(rest["params"]) == (0 if rule == "none" else len(one_d))
    forced = load_settings(method, "cpu-demo", [*TINY, *sets, "optim.decay_exclude=bias_norm_tokens"])
    assert decay_exclude(m, forced) == "bias_norm_tokens"  # one switch overrides the reference


def _grads(*norms: float) -> list[nn.Parameter]:
    params = []
    for i, n in enumerate(norms):
        p = nn.Parameter(torch.zeros(3 + i))
        g = torch.arange(1.0, 4.0 + i)
        p.grad = g / g.norm() * n  # a gradient of norm n
        params.append(p)
    return params


def test_per_tensor_clipping_is_dinos_utils_clip_gradients():
    params = _grads(5.0, 1.0, 3.0)
    untouched = params[1].grad.clone()
    clip_gradients(params, 3.0, "per_tensor")
    # each tensor alone: 5 -> 3 (x 3/(5+1e-6)), 1 untouched, 3 -> x 3/(3+1e-6) (just under 1)
    assert [round(float(p.grad.norm()), 5) for p in params] == [3.0, 1.0, 3.0]
    assert torch.equal(params[1].grad, untouched)  # below the limit: not scaled at all
    assert float(params[2].grad.norm()) == pytest.approx(3.0 * 3.0 / (3.0 + 1e-6), rel=1e-6)


def test_global_clipping_scales_every_tensor_by_one_factor():
    params = _grads(5.0, 1.0, 3.0)
    clip_gradients(params, 3.0, "global")
    total = (25 + 1 + 9) ** 0.5
    factor = 3.0 / (total + 1e-6)
    assert [float(p.grad.norm()) for p in params] == pytest.approx(
        [5 * factor, 1 * factor, 3 * factor], rel=1e-5
    )
    with pytest.raises(ValueError, match="clip_mode"):
        clip_gradients(_grads(1.0), 1.0, "layerwise")


def test_dino_clips_per_tensor_and_cancels_the_last_layer_after_clipping(monkeypatch):
    """main_dino.py: backward, clip_gradients, cancel_gradients_last_layer, step."""
    from sslmask import engine
    from sslmask.distributed import DistInfo

    cfg = load_settings("dino", "dino-cpu", ["data.image_size=32", "dino.local_size=16", "dino.out_dim=64",
                                           "model.proj_hidden=32", "model.proj_dim=16"])  # fmt: skip
    assert (cfg.optim.grad_clip, cfg.optim.clip_mode) == (3.0, "per_tensor")
    torch.manual_seed(0)
    method = build_method(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loop = engine.build_loop(method, cfg, info, spe=10, amp="none")
    calls = []
    monkeypatch.setattr(engine, "clip_gradients", lambda params, c, mode: calls.append(("clip", c, mode)))
    hook = method.before_optimizer_step
    monkeypatch.setattr(method, "before_optimizer_step", lambda p: (calls.append(("cancel",)), hook(p)))
    g = torch.Generator().manual_seed(0)
    batch = {
        f"view{v}": torch.randint(
            0, 255, (4, 3, 32 if v < 2 else 16, 32 if v < 2 else 16), dtype=torch.uint8, generator=g
        )
        for v in range(2 + method.dino.local_crops)
    }
    batch["index"] = torch.arange(4)
    assert engine.train_step(loop, batch) is not None
    assert calls == [("clip", 3.0, "per_tensor"), ("cancel",)]


# ---- which trunk is scored ------------------------------------------------------------------


def _run(tmp_path, name: str, *sets: str, eval_branch: str | None = "default"):
    """A run folder whose momentum trunk differs from its online one."""
    m = _method(name, *sets)
    with torch.no_grad():
        for p in m.branch_backbone("momentum").parameters():
            p.add_(0.5)
    ckpt = {"method": m.state_dict(), "step": 3, "config": m.settings.to_config()}
    if eval_branch is not None:
        ckpt["eval_branch"] = m.eval_branch if eval_branch == "default" else eval_branch
    run = tmp_path / name
    run.mkdir()
    save_atomic(ckpt, run / "checkpoint.pt")
    return run, m


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(("name", "auto"), [("dino", "momentum"), ("scfs", "momentum"), ("byol", "online"),
                                            ("mocov2", "online"), ("mocov3", "online")])  # fmt: skip
def test_runs_are_scored_on_the_trunk_their_reference_evaluates(tmp_path, name, auto):
    sets = ["dino.out_dim=64"] if name in ("dino", "scfs") else []
    run, m = _run(tmp_path, name, *sets)
    backbone, branch = load_backbone_branch(str(run))
    assert branch == auto and _same(backbone, m.branch_backbone(auto))
    for asked, want in (("online", "online"), ("student", "online"), ("momentum", "momentum"),
                        ("teacher", "momentum"), ("key", "momentum")):  # fmt: skip
        backbone, branch = load_backbone_branch(str(run), branch=asked)
        assert branch == want and _same(backbone, m.branch_backbone(want))
    assert not _same(m.branch_backbone("online"), m.branch_backbone("momentum"))


def test_branch_of_legacy_runs_dino_files_and_plain_state_dicts(tmp_path):
    run, m = _run(tmp_path, "dino", "dino.out_dim=64", eval_branch=None)  # saved before eval_branch
    backbone, branch = load_backbone_branch(str(run))  # issue 42 item 8: by method, DINO's teacher
    assert branch == "momentum" and _same(backbone, m.branch_backbone("momentum"))
    byol_run, _ = _run(tmp_path, "byol", eval_branch=None)
    assert load_backbone_branch(str(byol_run))[1] == "online"
    student, teacher = (
        backbone_state({"method": m.state_dict()}, "online"),
        backbone_state({"method": m.state_dict()}, "momentum"),
    )
    dino_file = {"student": {f"module.backbone.{k}": v for k, v in student.items()},
                 "teacher": {f"backbone.{k}": v for k, v in teacher.items()}}  # fmt: skip
    assert resolve_branch(dino_file) == "teacher"  # DINO's own checkpoints: the teacher, as eval_knn.py
    assert all(torch.equal(backbone_state(dino_file)[k], teacher[k]) for k in teacher)
    assert all(torch.equal(backbone_state(dino_file, "student")[k], student[k]) for k in student)
    assert resolve_branch(student) is None
    with pytest.raises(CheckpointError, match="one trunk"):
        backbone_state(student, "momentum")
    with pytest.raises(CheckpointError, match="must be one of"):
        backbone_state(dino_file, "ema")


def test_the_legacy_branch_table_is_each_methods_eval_branch():
    from sslmask.checkpoint import METHOD_EVAL_BRANCH
    from sslmask.methods import METHODS

    assert {n: c.eval_branch for n, c in METHODS.items() if c.eval_branch != "online"} == METHOD_EVAL_BRANCH


def test_eval_and_export_say_which_branch_they_scored(tmp_path, sample_build, capsys):
    from sslmask.cli import main

    run, m = _run(tmp_path, "dino", "dino.out_dim=64")
    common = ["--checkpoint", str(run), "--train", str(sample_build), "--val", str(sample_build),
              "--image-size", "32", "--workers", "0"]  # fmt: skip
    assert main(["eval", "knn", *common, "--k", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["branch"] == "momentum"
    assert main(["eval", "knn", *common, "--k", "5", "--branch", "student"]) == 0
    assert json.loads(capsys.readouterr().out)["branch"] == "online"
    out = tmp_path / "student.safetensors"
    assert main(["export", str(run), "--out", str(out), "--branch", "online"]) == 0
    assert "online branch" in capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["branch"] == "online"
    assert _same(load_backbone_branch(str(out))[0], m.branch_backbone("online"))
    assert main(["eval", "knn", *common, "--branch", "ema"]) == 1
    assert "--branch 'ema'" in capsys.readouterr().err


def test_training_records_the_methods_eval_branch(tmp_path, sample_build):
    from conftest import tiny_train_args

    from sslmask.checkpoint import load_file
    from sslmask.cli import main

    run = tmp_path / "run"
    args = tiny_train_args("dino", sample_build, run, "train.epochs=1", "dino.out_dim=32", "dino.local_crops=2",
                           "dino.local_size=24", "train.snapshot_epochs=[1]")  # fmt: skip
    assert main(args) == 0
    assert load_file(run / "checkpoint.pt")["eval_branch"] == "momentum"
    from safetensors import safe_open

    with safe_open(str(run / "snapshots" / "epoch001.safetensors"), "pt") as f:
        assert f.metadata()["branch"] == "momentum"


# ---- localisation preprocessing ------------------------------------------------------------


def test_localisation_probe_features_use_the_test_preprocessing(sample_build):
    """resized_features = each image resized to S x S (bicubic, no crop), normalised, pooled:
    what localization_eval feeds the probe at test time."""
    import numpy as np
    from PIL import Image

    from maskio.records import FileReader, decode_rgb, index_any
    from sslmask.backbones import build_backbone, normalize
    from sslmask.eval.localization import resized_features

    records = index_any([str(sample_build)])
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny").eval()
    feats, labels = resized_features(backbone, records, 40, batch_size=7, workers=0, device="cpu")
    reader = FileReader(records.files)
    for i in (0, 5, len(records) - 1):
        image = decode_rgb(reader.read(*records.image[i]), records.names[i])
        x = torch.from_numpy(np.asarray(image.resize((40, 40), Image.BICUBIC)).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            torch.testing.assert_close(feats[i], backbone.pooled(normalize(x))[0], rtol=1e-4, atol=1e-5)
        assert int(labels[i]) == int(records.labels[i])


def test_segas_offers_both_readings_of_eq_6_and_names_them():
    """Issue 42 item 4: the default is the batch mean of each sample's max (a reading ⟨A⟩);
    Eq. 6 as printed averages each prototype's max over the batch, and is offered."""
    from sslmask.losses import mu_threshold

    assert load_config("segas")["segas"]["mu"] == "sample_max"
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1]])  # 2 samples x 3 prototypes
    assert float(mu_threshold(sim, "sample_max")) == pytest.approx((0.9 + 0.3) / 2)
    assert float(mu_threshold(sim, "prototype_max")) == pytest.approx((0.9 + 0.3 + 0.1) / 3)
    assert float(mu_threshold(sim, "max")) == float(mu_threshold(sim, "sample_max"))  # saved configs


def test_segas_occlusion_probe_is_its_papers_schedule():
    """Issue 42 item 6: SegAS §4.2 trains the FC layer 60 epochs at lr 5.0, dividing by 10 at
    epochs 30, 40 and 50 (torch's MultiStepLR), on raw features; the occlusion eval uses it."""
    import inspect

    from sslmask.eval.linear import PROBES, fit_linear
    from sslmask.eval.occlusion import occlusion_eval

    segas = PROBES["segas"]
    layer = nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 40, 50], gamma=0.1)
    per_epoch = 3
    for epoch in range(60):
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            assert segas.lr_at(step, 60 * per_epoch, per_epoch) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        steps.step()
    assert segas.epochs == 60 and not segas.standardise
    feats = torch.randn(40, 6) * 3 + 2
    probe = fit_linear(feats, torch.arange(40) % 4, schedule=segas)
    assert torch.equal(probe.mean, torch.zeros(6)) and torch.equal(probe.std, torch.ones(6))
    assert inspect.signature(occlusion_eval).parameters["probe_schedule"].default == "segas"


def test_segas_offers_the_papers_x_q2_from_x_q1():
    """Issue 42 item 5: the paper fits x^{q2} = ApFS(x^{q1}) on the same crop; offered next to
    today's second aug+ view. With ``q2_from: q1`` the run has two views, and the filtered view
    is view 0 weighted by the momentum encoder's heatmap of view 0."""
    from sslmask.config import load_settings as load
    from sslmask.methods.segas import SegAS, apfs_keep
    from sslmask.pooling import channel_heatmap

    cfg = load("segas", "cpu-demo", [*TINY, "segas.q2_from=q1", "segas.apfs_prob=1.0"])
    assert len(SegAS.view_specs(cfg)) == 2 and len(SegAS.view_specs(load("segas"))) == 3
    assert load("segas").to_config()["segas"]["q2_from"] == "second_view"
    torch.manual_seed(0)
    m = build_method(cfg).eval()
    x = torch.randn(4, 3, 32, 32)
    p = torch.zeros(4, 5)
    p[:, 0] = 1.0  # confident: every sample fires
    x2, fired, _ = m.filtered_view({"view0": x, "view1": torch.randn(4, 3, 32, 32)}, p, Progress(0, 10, 10))
    with torch.no_grad():
        keep = apfs_keep(channel_heatmap(m.key_backbone(x), (32, 32)), m.segas.omega, m.segas.sigma)
    assert fired.all()
    torch.testing.assert_close(x2, x * keep)
