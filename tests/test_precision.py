"""``train.amp`` on CPU (issue 43): every method steps under bf16 autocast through the engine's
own path, keeps its losses, softmaxes and running state in float32, and follows its float32
twin from the same seed; fp16's GradScaler skips a step whose gradients overflowed."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sslmask import engine
from sslmask.config import load_settings
from sslmask.distributed import DistInfo
from sslmask.methods import METHODS, build_method
from sslmask.precision import PrecisionError, resolve_amp

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = ["model.proj_hidden=64", "model.proj_dim=32", "model.pred_hidden=64", "data.image_size=32",
         "data.batch_size=8"]  # fmt: skip
DINO_SMALL = ["dino.local_size=16", "dino.out_dim=256"]
# every method, and each mask mode whose step differs: (method, config overlay, sets)
VARIANTS = {
    "byol": ("byol", "cpu-demo", []),
    "harl": ("harl", "cpu-demo", []),
    "harl-channels_last": ("harl", "cpu-demo", ["train.channels_last=true"]),
    "mocov2": ("mocov2", "cpu-demo", []),
    "mocov3": ("mocov3", "cpu-demo", []),
    "mocov3-vit": ("mocov3", "cpu-demo", ["model.arch=vit_micro"]),
    "dino": ("dino", "dino-cpu", DINO_SMALL),
    "scfs": ("scfs", "dino-cpu", DINO_SMALL),
    "scfs-a": ("scfs", "dino-cpu", [*DINO_SMALL, "scfs.mask_mode=key"]),
    "scfs-c": ("scfs", "dino-cpu", [*DINO_SMALL, "scfs.mask_mode=key_query_gate"]),
    "segas": ("segas", "cpu-demo", []),
    "segas-salient": ("segas", "cpu-demo", ["segas.mask_mode=salient"]),
    "lodisc": ("lodisc", "cpu-demo", ["model.arch=vit_micro"]),
    "lodisc-saliency": ("lodisc", "cpu-demo", ["model.arch=vit_micro", "lodisc.mode=saliency"]),
    "lodisc-product": ("lodisc", "cpu-demo", ["model.arch=vit_micro", "lodisc.mode=product"]),
}
STEPS = 6
# Largest relative gap of a step's loss, bf16 against float32, over STEPS steps from the same
# seed. Measured: <= 0.01 for every ResNet method, 0.025 for MoCo v3 on the ViT (its batch-8
# steps amplify rounding fastest); bf16 keeps 8 bits of mantissa, so a gap of 0.4 % per matmul
# compounds over the steps.
TOLERANCE = 0.05
# ops whose bf16 input would lose what float32 keeps: the references' CUDA autocast runs these
# in float32, CPU autocast does not, so the methods cast before them
FLOAT32_OPS = {"_softmax", "_log_softmax", "xlogy", "linalg_vector_norm", "nll_loss_forward"}


class LowPrecisionAudit(TorchDispatchMode):
    """Counts the FLOAT32_OPS that ran on a bf16 tensor, and the ops that ran in bf16 at all."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, int] = {}
        self.bf16_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            self.bf16_ops += 1
            if name in FLOAT32_OPS:
                self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _batch(cfg: dict, name: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch as the loader gives it: uint8 views and masks (a box of foreground)."""
    batch = {"index": torch.arange(8)}
    for v, spec in enumerate(METHODS[name].view_specs(cfg)):
        batch[f"view{v}"] = torch.randint(
            0, 255, (8, 3, spec.size, spec.size), dtype=torch.uint8, generator=g
        )
        mask = torch.zeros(8, 1, spec.size, spec.size, dtype=torch.uint8)
        mask[:, :, spec.size // 4 : 3 * spec.size // 4, spec.size // 5 : 4 * spec.size // 5] = 255
        batch[f"mask{v}"] = mask
    return batch


def _seed_prototypes(method) -> None:
    """SegAS past its warm-up: two levels of unit prototypes and labels for the 8 samples."""
    g = torch.Generator().manual_seed(1)
    dim = method.queue.shape[1]
    method.prototypes = [
        torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=1) for m in (6, 3)
    ]
    method.instance_labels = torch.stack([torch.arange(8) % 6, torch.arange(8) % 3])


def _steps(variant: str, amp: str, audit: LowPrecisionAudit | None = None, sets: tuple[str, ...] = ()):
    name, overlay, own = VARIANTS[variant]
    cfg = load_settings(name, overlay, [*SMALL, *own, *sets])
    torch.manual_seed(0)
    method = build_method(cfg, init=True)
    if name == "segas":
        _seed_prototypes(method)
    loop = engine.build_loop(method, cfg, CPU, spe=10, amp=amp)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        if audit is None:
            out = engine.train_step(loop, _batch(cfg, name, g))
        else:
            with audit:
                out = engine.train_step(loop, _batch(cfg, name, g))
        assert out is not None, f"{variant} {amp}: a non-finite loss"
        losses.append(out["loss"])
    return losses, method, out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_steps_follow_float32_and_keep_losses_and_state_in_float32(variant):
    audit = LowPrecisionAudit()
    bf16, method, out = _steps(variant, "bf16", audit)
    fp32, _, _ = _steps(variant, "none")
    gap = max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(bf16, fp32, strict=True))
    assert gap < TOLERANCE, (bf16, fp32)
    assert audit.bf16_ops > 50 and bf16 != fp32  # the step did run in bf16
    # LoDisc's attention maps come from timm's own softmax (under no_grad, used to rank patches
    # only): the one place bf16 reaches a softmax, listed in docs/training.md
    allowed = {"_softmax"} if variant in ("lodisc", "lodisc-product") else set()
    assert set(audit.seen) <= allowed, audit.seen
    for name, t in [*method.named_parameters(), *method.named_buffers()]:
        assert t.dtype in (torch.float32, torch.int64, torch.bool), f"{name}: {t.dtype}"
    for extra in ("queue", "center", "prototypes"):
        for t in getattr(method, extra, []) if extra == "prototypes" else [getattr(method, extra, None)]:
            assert t is None or t.dtype == torch.float32, extra
    assert all(v.dtype == torch.float32 for v in out.values() if isinstance(v, torch.Tensor))


def test_resolve_amp_on_cpu_follows_torchs_amx_check_and_refuses_fp16(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_amp("none", cpu) == "none"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_amp("auto", cpu) == "none"
    with pytest.raises(PrecisionError, match="train.amp=fp16 needs CUDA"):
        resolve_amp("fp16", cpu)


def test_resolve_amp_on_cuda_prefers_bf16_and_falls_back_to_fp16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_amp("auto", cuda) == "bf16" and resolve_amp("fp16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_amp("auto", cuda) == "fp16"


def test_a_resumed_run_keeps_the_precision_it_started_with():
    cuda = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    assert engine.run_precision("auto", {"amp": "none"}, CPU) == "none"
    assert engine.run_precision("none", {"amp": "bf16"}, CPU) == "bf16"
    assert engine.run_precision("bf16", {}, CPU) == "none"  # before amp was recorded, CPU ran float32
    assert engine.run_precision("fp16", {}, cuda) == "fp16"
    with pytest.raises(engine.CheckpointError, match="trained in fp16 on CUDA; resume it on a GPU"):
        engine.run_precision("none", {"amp": "fp16"}, CPU)


def test_fp16_gradscaler_skips_an_overflowing_step_and_lowers_its_scale():
    """The engine's fp16 path through GradScaler's public API (CPU autocast takes fp16 too):
    a step whose gradients hold an inf leaves the weights alone and halves the scale, the
    schedule still advances, and the next clean step updates."""
    cfg = load_settings("byol", "cpu-demo", SMALL)
    torch.manual_seed(0)
    method = build_method(cfg, init=True)
    loop = engine.build_loop(method, cfg, CPU, spe=10, amp="fp16")
    assert loop.scaler.is_enabled()
    g = torch.Generator().manual_seed(0)
    weight = next(method.backbone.parameters())
    before, scale = weight.detach().clone(), loop.scaler.get_scale()
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    assert engine.train_step(loop, _batch(cfg, "byol", g)) is not None
    handle.remove()
    assert torch.equal(weight.detach(), before) and loop.scaler.get_scale() == scale / 2 and loop.step == 1
    engine.train_step(loop, _batch(cfg, "byol", g))
    assert not torch.equal(weight.detach(), before) and loop.step == 2


def test_fp16_on_cpu_is_refused_in_one_line(sample_build, tmp_path, capsys):
    from conftest import refused_train

    err = refused_train("byol", sample_build, tmp_path / "run", ["train.amp=fp16"], capsys)
    assert "train.amp=fp16 needs CUDA" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["byol", "mocov3-vit"])
def test_compiled_step_on_cpu_matches_the_eager_one_under_bf16(variant):
    """``train.compile`` through inductor's CPU backend (a C++ compiler; about a minute on 2
    cores), under the bf16 autocast a GPU run uses: the losses of the eager steps within the
    bf16 tolerance (inductor fuses and rounds differently: 2 % apart for BYOL, where eager bf16
    is 0.7 % from float32). One method per backbone family: a ResNet and the ViT."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    eager, _, _ = _steps(variant, "bf16")
    compiled, _, _ = _steps(variant, "bf16", sets=["train.compile=true"])
    assert max(abs(a - b) / abs(b) for a, b in zip(compiled, eager, strict=True)) < TOLERANCE


def test_similarities_of_float32_references_stay_float32_under_autocast():
    """Autocast runs every matrix product in bf16 whatever its inputs, so casting q and the
    queue to float32 did not keep MoCo v2's logits in float32: on Imagenette (3 seeds) MoCo v2
    trained in bf16 probed 1.9 +- 0.5 points below float32. The product now runs with autocast
    off; checked against a float64 reference (bf16's products miss it by about 2e-3)."""
    import torch.nn.functional as F

    from sslmask.losses import float32_products, info_nce

    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(16, 64, generator=g), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(1024, 64, generator=g), dim=1)
    d = q.double()
    logits = torch.cat([(d * k.double()).sum(1, keepdim=True), d @ queue.double().T], dim=1) / 0.2
    reference = -torch.log_softmax(logits, dim=1)[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        products = float32_products(q, queue)
        loss = info_nce(q, k, queue, 0.2)
        plain = q @ queue.T  # what autocast does to a product left alone
    assert products.dtype == torch.float32 and loss.dtype == torch.float32
    assert (products.double() - d @ queue.double().T).abs().max() < 1e-5
    assert (loss.double() - reference).abs().max() < 1e-4
    assert plain.dtype == torch.bfloat16  # the trap the helper avoids
