"""Training-step time of every method at the same backbone, batch and image size, against the
backbone's bare forward + backward over the same views.

    python benchmarks/train_step.py [--arch resnet18] [--batch 32] [--size 112] [--steps 10]
                                     [--repeats 3] [--device cpu|cuda] [--amp bf16]
                                     [--methods byol harl dino mocov2 mocov3] [--set KEY=VALUE ...]
    python benchmarks/train_step.py --arch vit_tiny --methods mocov3 lodisc lodisc-sal=lodisc:lodisc.mode=saliency
    python benchmarks/train_step.py --precisions fp32 bf16 bf16-cl bf16-compile   # images/s per precision

``--precisions`` (issue 43) times the engine step alone (no bare replay) per method and per
precision: ``fp32``, ``bf16`` (autocast), ``-cl`` channels_last, ``-compile`` torch.compile
(the compile itself is excluded: warm-up steps), interleaved, with the machine's CPU and flags.

A step is the engine's: forward (every view, online and target networks), backward, the
method's hooks around a LARS step (EMA, queue, centre), on fixed synthetic batches (data
loading excluded: see loader_throughput.py). "bare" replays every backbone pass that step made
(recorded at the trunk's entry points: the same inputs, the same trunk, with a backward where
the step took gradients and under no_grad where it did not: the target network's passes, the
momentum encoder's), then the same LARS update of the backbone's own parameters: what training
the trunk alone on those passes would cost. A method's own overhead (heads, losses,
EMA, queue, view surgery) is ``1 - bare / step``. Targets (issue 14): overhead <= 15 % of the
step; HARL <= 1.05x BYOL; SCFS <= 1.35x DINO (issue 16); LoDisc <= 1.4x MoCo v3 (issue 18);
SegAS against MoCo v2 (issue 17: no target). Each method keeps its own heads and views (DINO:
2 global + its local crops), so the same --size is the global view size. Interleaved repeats,
medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ssl_compare import parse_variant

from sslmask.config import RunSettings, default_config, load_settings
from sslmask.methods import METHODS, build_method
from sslmask.optim import build_optimizer
from sslmask.progress import Progress

BASELINES = {"harl": "byol", "scfs": "dino", "lodisc": "mocov3", "segas": "mocov2"}


def seed_prototypes(method, dim: int, n: int = 2600) -> None:
    """SegAS past its warm-up: prototypes of ``n`` random unit vectors (the automatic sizes for
    ``n`` images), so the timed step pays for every SegAS term."""
    import numpy as np

    from sslmask.prototypes import hierarchical_kmeans, prototype_sizes

    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    cents, labels = hierarchical_kmeans(x.numpy(), prototype_sizes(None, n), niter=5, nredo=1)
    method.prototypes = [torch.from_numpy(c).to(method.queue.device) for c in cents]
    method.instance_labels = torch.from_numpy(np.stack(labels)).to(method.queue.device)


def make_config(label: str, args) -> RunSettings:
    """The config of a ``--methods`` entry (a name, or ``LABEL=METHOD:KEY=VALUE...``)."""
    _, name, own = parse_variant(label)
    sets = [f"model.arch={args.arch}", f"data.image_size={args.size}", *args.set]
    sections = set(default_config(name))  # scfs takes dino.* sets too
    return load_settings(name, None, [*[s for s in sets if s.split(".")[0] in sections], *own])


def make(label: str, args):
    """The method of a ``--methods`` entry and a fixed batch of its views and masks."""
    cfg = make_config(label, args)
    name = cfg.method
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    method = build_method(cfg).to(args.device, memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    batch = {}
    for v, spec in enumerate(METHODS[name].view_specs(cfg)):
        x = torch.randn(args.batch, 3, spec.size, spec.size, generator=g)
        batch[f"view{v}"] = x.to(args.device, memory_format=fmt)
        mask = torch.zeros(args.batch, 1, spec.size, spec.size)
        mask[:, :, spec.size // 4 : 3 * spec.size // 4, spec.size // 5 : 4 * spec.size // 5] = 1
        batch[f"mask{v}"] = mask.to(args.device)
    batch["index"] = torch.arange(args.batch, device=args.device)
    if name == "segas":
        seed_prototypes(method, cfg.model.proj_dim)
    return method, batch


def amp_dtype(args) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` (None: full precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)


def _timed(fn, args) -> list[float]:
    times = []
    for i in range(args.steps + 2):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return times


def step_times(name: str, args) -> list[float]:
    """Seconds per engine step of ``name`` (after 2 warm-up steps)."""
    return _timed(engine_step(name, args)[0], args)


def engine_step(name: str, args):
    """One engine step of ``name`` on its fixed batch, as a function of the step index, and the
    method it steps."""
    method, batch = make(name, args)
    opt = build_optimizer("lars", method.param_groups(1e-6), 0.1)
    dtype = amp_dtype(args)
    forward = torch.compile(method) if getattr(args, "compile", False) else method

    def step(i: int) -> None:
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            loss = forward(batch, Progress(i, 100, 10))["loss"]
        if not torch.isfinite(loss):  # a step that produces NaN is not a step worth timing
            raise RuntimeError(f"{name}: loss is not finite at step {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(Progress(i, 100, 10))
        opt.step()
        method.after_optimizer_step(Progress(i, 100, 10))

    return step, method


def flops(fn) -> float:
    """FLOPs of one call (torch's FlopCounterMode: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def step_and_bare_flops(name: str, args) -> tuple[float, float]:
    """FLOPs of engine step 1 of ``name`` (step 0 initialises lazily) and of its backbone passes."""
    step, method = engine_step(name, args)
    step(0)
    with BackbonePasses(method) as passes:
        total = flops(lambda: step(1))
    dtype = amp_dtype(args)
    return total, flops(lambda: BackbonePasses.replay(passes.calls, dtype))


def print_flops(args) -> None:
    """``--flops``: each method's step and bare backbone in GFLOPs per image, independent of load."""
    print(f"{args.arch}, batch {args.batch}, {args.size}px: GFLOPs per image (FlopCounterMode)")
    print(f"{'method':<12}{'step':>10}{'bare':>10}{'overhead':>10}")
    per_image = {}
    for name in args.methods:
        step, bare = (f / args.batch for f in step_and_bare_flops(name, args))
        per_image[name] = step
        print(f"{parse_variant(name)[0]:<12}{step / 1e9:>10.2f}{bare / 1e9:>10.2f}{1 - bare / step:>10.1%}")
    for label, step in per_image.items():
        base = BASELINES.get(parse_variant(label)[1])
        if base in per_image:
            print(f"{parse_variant(label)[0]} / {base} FLOPs per step: {step / per_image[base]:.3f}")


TRUNK_ENTRIES = ("forward", "features", "pooled", "stage_features", "attention_maps", "pooled_and_attention")


class BackbonePasses:
    """Records every outermost call of a trunk entry point while active: (trunk, entry, input,
    other arguments, whether it took gradients), so :meth:`replay` can redo exactly those passes."""

    def __init__(self, method: torch.nn.Module):
        from sslmask.backbones import ResNetTrunk
        from sslmask.vit import ViTTrunk

        self.trunks = [m for m in method.modules() if isinstance(m, (ResNetTrunk, ViTTrunk))]
        self.calls: list[tuple] = []
        self._depth = 0

    def _wrap(self, trunk: torch.nn.Module, entry: str):
        original = getattr(trunk, entry)

        def recorded(x, *rest, **kwargs):
            if self._depth == 0:
                grad = torch.is_grad_enabled() and any(p.requires_grad for p in trunk.parameters())
                self.calls.append((trunk, entry, x.detach(), rest, kwargs, grad))
            self._depth += 1
            try:
                return original(x, *rest, **kwargs)
            finally:
                self._depth -= 1

        return recorded

    def __enter__(self) -> BackbonePasses:
        self.calls = []
        for trunk in self.trunks:
            for entry in TRUNK_ENTRIES:
                if hasattr(trunk, entry):
                    # an instance attribute shadows the class's method until __exit__ pops it
                    setattr(trunk, entry, self._wrap(trunk, entry))
        return self

    def __exit__(self, *exc) -> None:
        for trunk in self.trunks:
            for entry in TRUNK_ENTRIES:
                trunk.__dict__.pop(entry, None)

    @staticmethod
    def replay(calls: list[tuple], dtype) -> None:
        """The recorded passes again, with one backward through those that took gradients."""
        device = calls[0][2].device.type
        loss = None
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            for trunk, entry, x, rest, kwargs, grad in calls:
                with torch.set_grad_enabled(grad):
                    out = getattr(trunk, entry)(x, *rest, **kwargs)
                if grad:
                    term = sum(t.float().mean() for t in _tensors(out))
                    loss = term if loss is None else loss + term
        if loss is not None:
            loss.backward()


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)]


def step_and_bare(name: str, args) -> tuple[list[float], list[float]]:
    """Seconds per engine step of ``name``, and per replay of the backbone passes of that step."""
    step, method = engine_step(name, args)
    passes = BackbonePasses(method)
    dtype = amp_dtype(args)
    recorded: list[list[tuple]] = []

    def recording_step(i: int) -> None:
        with passes:
            step(i)
        recorded.append(passes.calls)

    step_times_ = _timed(recording_step, args)
    method.zero_grad(set_to_none=True)
    trunk_opt = build_optimizer("lars", [{"params": list(method.backbone.parameters())}], 0.1)

    def bare(i: int) -> None:  # what training the trunk alone would pay: its passes and its update
        trunk_opt.zero_grad(set_to_none=True)
        BackbonePasses.replay(recorded[i], dtype)
        trunk_opt.step()

    return step_times_, _timed(bare, args)


def precision_args(args, mode: str):
    """``args`` for one ``--precisions`` entry: fp32 | bf16 | fp16, then -cl and/or -compile."""
    amp, *extras = mode.split("-")
    if amp not in ("fp32", "bf16", "fp16") or not set(extras) <= {"cl", "compile"}:
        raise SystemExit(f"--precisions {mode}: fp32|bf16|fp16 with optional -cl and -compile")
    return argparse.Namespace(**{**vars(args), "amp": "none" if amp == "fp32" else amp,
                                 "channels_last": "cl" in extras, "compile": "compile" in extras})  # fmt: skip


def precision_table(args) -> None:
    """Images/s of each method in each precision (median of the repeats' median steps)."""
    from machine import describe

    times = {(m, p): [] for m in args.methods for p in args.precisions}
    for _ in range(args.repeats):  # interleaved: a load change hits every cell alike
        for name in args.methods:
            for mode in args.precisions:
                times[name, mode].append(statistics.median(step_times(name, precision_args(args, mode))))
    print(describe())
    print(f"{args.arch}, batch {args.batch}, {args.size}px, {args.device}: images/s, median of {args.repeats}"
          f" (x: speed-up over {args.precisions[0]})")  # fmt: skip
    print(f"{'method':<12}" + "".join(f"{p:>20}" for p in args.precisions))
    for name in args.methods:
        base = statistics.median(times[name, args.precisions[0]])
        cells = []
        for mode in args.precisions:
            t = statistics.median(times[name, mode])
            cells.append(f"{args.batch / t:>12.1f} ({base / t:.2f}x)")
        print(f"{parse_variant(name)[0]:<12}" + "".join(f"{c:>20}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--methods", nargs="+", default=["byol", "harl", "dino", "mocov2", "mocov3"])
    ap.add_argument("--set", action="append", default=[], help="A config override for every method.")
    ap.add_argument("--flops", action="store_true", help="Count FLOPs of one step instead of timing.")
    ap.add_argument("--precisions", nargs="+", help="Time each method in these precisions (see above).")
    args = ap.parse_args()
    if args.precisions:
        precision_table(args)
        return
    if args.flops:
        print_flops(args)
        return
    runs: dict[str, dict[str, list[float]]] = {m: {"step": [], "bare": []} for m in args.methods}
    for _ in range(args.repeats):  # interleaved
        for name in args.methods:
            step, bare = step_and_bare(name, args)
            runs[name]["step"].append(statistics.median(step))
            runs[name]["bare"].append(statistics.median(bare))
    print(
        f"{args.arch}, batch {args.batch}, {args.size}px, {args.device}, amp {args.amp}; median of {args.repeats}"
    )
    print(f"{'method':<12}{'views':>6}{'ms/step':>10}{'images/s':>10}{'bare ms':>10}{'overhead':>10}")
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
    for name, t in med.items():
        views = len(METHODS[parse_variant(name)[1]].view_specs(make_config(name, args)))
        print(f"{parse_variant(name)[0]:<12}{views:>6}{1000 * t['step']:>10.1f}{args.batch / t['step']:>10.1f}"
              f"{1000 * t['bare']:>10.1f}{1 - t['bare'] / t['step']:>10.1%}")  # fmt: skip
    for label in med:  # targets: HARL <= 1.05x BYOL, SCFS <= 1.35x DINO, LoDisc <= 1.4x MoCo v3
        base = BASELINES.get(parse_variant(label)[1])
        if base in med:
            print(
                f"{parse_variant(label)[0]} / {base} step time: {med[label]['step'] / med[base]['step']:.3f}"
            )


if __name__ == "__main__":
    main()
