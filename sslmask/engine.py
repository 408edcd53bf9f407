"""The training loop: explicit, one iteration at a time (in the style of DINO's main_dino.py).

Learning rate, EMA rate and the method's own coefficients are functions of the step, so a
checkpoint needs only the step to restore them; the data position is the step too (see
``sslmask.dataset``). With ``train.deterministic`` a run SIGKILLed and resumed with
``--resume auto`` ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from maskio.atomic import atomic_open
from maskio.buildlock import reading_builds
from maskio.memory import check_fits
from maskio.records import Records, index_cached
from maskio.safeload import UnsafeDocument, check_depth
from sslmask import distributed as D
from sslmask.backbones import normalize
from sslmask.checkpoint import (
    CONFIG_FILE,
    INDEX_CACHE,
    LOG_FILE,
    CheckpointError,
    backbone_state,
    load_file,
    run_checkpoint_path,
    save_atomic,
)
from sslmask.config import ConfigError, diff
from sslmask.dataset import EpochBatchSampler, ViewsDataset, steps_per_epoch
from sslmask.eval.knn import knn_eval
from sslmask.features import extract_features_sharded
from sslmask.methods import METHODS, SSLMethod, build_method
from sslmask.optim import build_optimizer, clip_gradients
from sslmask.precision import PrecisionError, amp_dtype, resolve_amp
from sslmask.progress import Progress
from sslmask.schedules import cosine, warmup_cosine
from sslmask.settings import RunSettings, TrainSettings

TB_DIR = "tb"


class TrainingError(Exception):
    """The run cannot go on (diverged, or a resume that does not match the run folder)."""


class RunLog:
    """JSON lines (always) and TensorBoard scalars (when tensorboard is installed), rank 0 only."""

    def __init__(self, run: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(run / LOG_FILE, "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / TB_DIR))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _set_determinism(train: TrainSettings, info: D.DistInfo) -> None:
    seed = train.seed
    random.seed(seed + info.rank)
    torch.manual_seed(seed + info.rank)
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


RUN_CHECKPOINT_KEYS = ("method", "optimizer", "scaler", "step", "config", "rng")


def _prepare_run_dir(run: Path, s: RunSettings, resume: bool, info: D.DistInfo) -> dict[str, Any] | None:
    """Create or check the run folder; the checkpoint to resume from, if any."""
    cfg = s.to_config()
    ckpt_path = run_checkpoint_path(run)
    saved_cfg = run / CONFIG_FILE
    if resume and ckpt_path.exists():
        ckpt = load_file(ckpt_path)
        missing = [k for k in RUN_CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise CheckpointError(f"{ckpt_path}: not an sslmask run checkpoint (no {', '.join(missing)})")
        check_resume_state(ckpt, ckpt_path)
        # more epochs extend a run; the precision is the checkpoint's own (run_precision)
        changed = [k for k in diff(ckpt["config"], cfg) if k not in ("train.epochs", "train.amp")]
        if changed:
            raise TrainingError(f"{run}: the config differs from the run's on {', '.join(changed)}")
        if info.main:
            _truncate_log(run / LOG_FILE, int(ckpt["step"]))
        return ckpt
    # only rank 0 judges the folder: the others would race with the config it writes
    if not resume and info.main and (ckpt_path.exists() or saved_cfg.exists()):
        raise TrainingError(f"{run}: already holds a run; use --resume auto or another --out")
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / LOG_FILE).unlink(missing_ok=True)
        with atomic_open(saved_cfg, "w") as fh:
            fh.write(yaml.safe_dump(cfg, sort_keys=False))
    D.barrier(info)
    return None


MAX_STEP = 10**12  # far past any real run (ImageNet-1k, 800 epochs at batch 1: 10^9 steps)


def check_resume_state(ckpt: dict[str, Any], path: Path) -> None:
    """The fields a resume uses, of the types it uses them as: a doctored or corrupted run
    checkpoint is one CheckpointError line naming the field, before anything is restored."""
    problems = {
        "step": not (
            isinstance(ckpt["step"], int)
            and not isinstance(ckpt["step"], bool)
            and 0 <= ckpt["step"] <= MAX_STEP
        ),  # fmt: skip
        "config": not isinstance(ckpt["config"], dict),
        "method": not isinstance(ckpt["method"], dict),
        "optimizer": not isinstance(ckpt["optimizer"], dict),
        "scaler": not isinstance(ckpt["scaler"], dict),
        "rng": not (
            isinstance(ckpt["rng"], dict)
            and isinstance(ckpt["rng"].get("torch"), torch.Tensor)
            and ckpt["rng"]["torch"].dtype == torch.uint8
            and isinstance(ckpt["rng"].get("python"), (list, tuple))
            and len(ckpt["rng"]["python"]) == 625
            and all(isinstance(v, int) for v in ckpt["rng"]["python"])
        ),  # fmt: skip
        "eval_branch": "eval_branch" in ckpt and ckpt["eval_branch"] not in ("online", "momentum"),
        "amp": "amp" in ckpt and ckpt["amp"] not in ("bf16", "fp16", "none"),
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        value = ckpt[bad[0]]
        shown = repr(value)[:40] if isinstance(value, (int, str, float)) else type(value).__name__
        raise CheckpointError(f"{path}: corrupt resume state: {bad[0]} is {shown}")
    try:
        check_depth(ckpt["config"])
    except UnsafeDocument as exc:
        raise CheckpointError(f"{path}: corrupt resume state: config {exc}") from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint: the resumed run logs those steps again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a crash mid-write: the resumed run logs its step again
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        # an epoch row at the checkpoint's own step is written again: the resumed run starts
        # that epoch (before_epoch) anew
        if record["step"] < step or (record["step"] == step and record.get("kind") != "epoch"):
            kept.append(line)
    with atomic_open(path, "w") as fh:
        fh.write("".join(line + "\n" for line in kept))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def knn_monitor(
    backbone: torch.nn.Module, records: Records, s: RunSettings, info: D.DistInfo
) -> dict[str, float] | None:
    """k-NN top-1 of held-out training samples against the rest (labels never train the model).

    Every rank embeds its own slice of the samples; the features meet on every rank (the
    result is returned on rank 0 only, which logs it).
    """
    n = len(records)
    feats, labels = extract_features_sharded(backbone, records, s.data.image_size, info)
    if not info.main:
        return None
    held = torch.randperm(n, generator=torch.Generator().manual_seed(0))[
        : max(1, int(n * s.monitor.knn_holdout))
    ]
    is_query = torch.zeros(n, dtype=torch.bool)
    is_query[held] = True
    k = s.monitor.knn_k
    res = knn_eval(feats[~is_query], labels[~is_query], feats[is_query], labels[is_query], ks=(k,))
    return {"knn_top1": res[f"k={k}"]["top1"]}


def check_config(s: RunSettings, info: D.DistInfo) -> None:
    """Refuse what cannot run on this machine, before anything is read or written (the values
    themselves were checked when the config was parsed)."""
    if s.train.sync_bn and info.world_size > 1 and info.device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    try:
        resolve_amp(s.train.amp, info.device)
    except PrecisionError as exc:
        raise ConfigError(str(exc)) from None


def check_model_memory(s: RunSettings) -> None:
    """The model built on the meta device (no memory), its parameters and buffers counted: their
    bytes four times over (weights, gradients, optimiser state, momentum copies) must fit the
    memory left, or a size such as ``model.proj_hidden=100000000`` is one ConfigError line
    instead of an allocation failure or an OOM kill."""
    try:
        with torch.device("meta"):
            method = build_method(s)
    except ValueError as exc:  # what the real build would refuse, said before it
        raise ConfigError(str(exc)) from exc
    n = sum(t.numel() for t in (*method.parameters(), *method.buffers()))
    try:
        check_fits(4 * 4 * n, f"{s.method} with {s.model.arch} ({n / 1e6:,.0f} M parameters)")
    except MemoryError as exc:
        raise ConfigError(
            f"{exc}: lower model.proj_hidden, model.proj_dim or the method's head sizes"
        ) from None


def run_precision(requested: str, ckpt: dict[str, Any] | None, info: D.DistInfo) -> str:
    """The precision this run computes in: a resumed run keeps the one it started with (a
    checkpoint from before ``amp`` was recorded ran float32 on CPU, ``train.amp`` on CUDA); a
    new run resolves ``train.amp`` on this device."""
    if ckpt is None:
        return resolve_amp(requested, info.device)
    recorded = ckpt.get("amp", requested if info.device.type == "cuda" else "none")
    if recorded == "auto":  # an old CUDA checkpoint of an auto config cannot exist: auto is new
        recorded = resolve_amp(recorded, info.device)
    if recorded == "fp16" and info.device.type != "cuda":
        raise CheckpointError(f"the run trained in fp16 on CUDA; resume it on a GPU, not {info.device.type}")
    return recorded


def load_records(shards: list[str], s: RunSettings, run: Path, info: D.DistInfo) -> Records:
    """Rank 0 indexes the shards (or reads its cache); the others then read that cache."""
    needs_masks = METHODS[s.method].reads_masks(s)
    images = s.data.images
    if info.main:
        records = index_cached(shards, needs_masks, run / INDEX_CACHE, images)
    D.barrier(info)
    if not info.main:
        records = index_cached(shards, needs_masks, run / INDEX_CACHE, images)
    return records


@dataclass
class Loop:
    """What one training run carries from step to step."""

    method: SSLMethod  # the unwrapped module: hooks, state_dict, EMA
    forward: Any  # what runs the batch: the method, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    s: RunSettings  # the run's settings (saved in the checkpoint as ``s.to_config()``)
    info: D.DistInfo
    steps_per_epoch: int
    total: int
    warmup: int
    base_lr: float
    memory_format: torch.memory_format
    amp: str  # the resolved precision: bf16, fp16 or none (sslmask.precision)
    step: int = 0
    nan_skips: int = 0
    last_saved: int = 0

    @property
    def progress(self) -> Progress:
        """What the method's hooks are told about this step."""
        return Progress(self.step, self.total, self.steps_per_epoch, self.s.train.seed, self.info.rank)


def build_loop(method: SSLMethod, s: RunSettings, info: D.DistInfo, spe: int, amp: str) -> Loop:
    """Device, optimiser (with the method's parameter groups), AMP (``amp`` resolved: bf16, fp16
    or none) and the DDP wrapper."""
    if s.train.sync_bn and info.world_size > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    memory_format = torch.channels_last if s.train.channels_last else torch.contiguous_format
    method = method.to(info.device, memory_format=memory_format)
    base_lr = s.optim.lr * s.data.batch_size * info.world_size / 256
    groups = method.param_groups(s.optim.weight_decay, decay_exclude(method, s))
    optimizer = build_optimizer(s.optim.name, groups, base_lr, s.optim.momentum)
    model: torch.nn.Module = method
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    return Loop(
        method=method,
        forward=torch.compile(model) if s.train.compile else model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(info.device.type, enabled=amp == "fp16"),
        s=s,
        info=info,
        steps_per_epoch=spe,
        total=spe * s.train.epochs,
        warmup=spe * s.optim.warmup_epochs,
        base_lr=base_lr,
        memory_format=memory_format,
        amp=amp,
    )


def decay_exclude(method: SSLMethod, s: RunSettings) -> str:
    """``optim.decay_exclude`` with ``auto`` resolved to the method's reference rule."""
    rule = s.optim.decay_exclude
    return type(method).reference_decay_exclude(s) if rule == "auto" else rule


def restore(loop: Loop, ckpt: dict[str, Any], run: Path) -> None:
    try:
        loop.method.load_state_dict(ckpt["method"])
        loop.optimizer.load_state_dict(ckpt["optimizer"])
        loop.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__  # one line, however torch put it
        raise CheckpointError(f"{run_checkpoint_path(run)}: does not fit this run ({said})") from None
    loop.step = loop.last_saved = int(ckpt["step"])
    _restore_rng(ckpt["rng"])


def apply_schedules(loop: Loop) -> dict[str, float]:
    """Learning rate (warm-up, cosine) and weight decay (cosine to ``weight_decay_end``) of this step."""
    optim = loop.s.optim
    final = optim.final_lr * loop.s.data.batch_size * loop.info.world_size / 256
    lr = warmup_cosine(loop.base_lr, loop.step, loop.total, loop.warmup, final)
    out = {"lr": lr}
    if optim.weight_decay_end is not None:
        out["wd"] = cosine(optim.weight_decay, optim.weight_decay_end, loop.step, loop.total)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
        if "wd" in out and group["weight_decay"] > 0:
            group["weight_decay"] = out["wd"]
    return out


def device_inputs(loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalised views (and masks in [0, 1], crop boxes and flips) on the training device."""
    dev = loop.info.device
    inputs = {}
    for key, value in batch.items():
        if key.startswith("view"):
            x = normalize(value.to(dev, non_blocking=True))
            inputs[key] = x.contiguous(memory_format=loop.memory_format)
        elif key.startswith("mask"):
            inputs[key] = value.to(dev, non_blocking=True).float() / 255
        elif key.startswith(("box", "flip")) or key == "index":
            inputs[key] = value.to(dev, non_blocking=True)
    return inputs


def train_step(loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """One optimiser step; None when the loss was not finite on some rank (the step is skipped)."""
    logged = apply_schedules(loop)
    inputs = device_inputs(loop, batch)
    progress = loop.progress
    dtype = amp_dtype(loop.amp)
    with torch.autocast(loop.info.device.type, dtype=dtype, enabled=dtype is not None):
        out = loop.forward(inputs, progress)
    loss = out["loss"]
    if not D.all_true(bool(torch.isfinite(loss)), loop.info):
        loop.nan_skips += 1
        loop.optimizer.zero_grad(set_to_none=True)
        loop.step += 1  # a step without an update: the sampler's epochs and the schedules stay on course
        return None
    loop.nan_skips = 0
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(loss).backward()
    optim = loop.s.optim
    if optim.grad_clip > 0:  # clip, then the method's hook (DINO's order: clip, cancel last layer)
        loop.scaler.unscale_(loop.optimizer)
        params = [p for group in loop.optimizer.param_groups for p in group["params"]]
        clip_gradients(params, optim.grad_clip, optim.clip_mode)
    loop.method.before_optimizer_step(progress)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    logged.update(loop.method.after_optimizer_step(progress))
    loop.step += 1
    return {**logged, **{k: float(v.detach()) for k, v in out.items()}}


def _save(loop: Loop, run: Path) -> None:
    loop.last_saved = loop.step
    if loop.info.main:
        state = {
            "method": loop.method.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scaler": loop.scaler.state_dict(),
            "step": loop.step,
            "config": loop.s.to_config(),
            "rng": _rng_state(),
            "eval_branch": loop.method.eval_branch,
            "amp": loop.amp,
        }
        save_atomic(state, run_checkpoint_path(run))
    D.barrier(loop.info)


def snapshot_path(run: Path, epoch: int) -> Path:
    return run / "snapshots" / f"epoch{epoch:03d}.safetensors"


def save_snapshot(loop: Loop, run: Path, epoch: int) -> None:
    """The evaluated backbone (the method's ``eval_branch``) after ``epoch``, as ``sslmask
    export`` writes it: a learning curve from one run (``benchmarks/learning_curve.py``)
    without keeping full checkpoints."""
    if loop.info.main:
        state = backbone_state({"method": loop.method.state_dict(), "eval_branch": loop.method.eval_branch})
        path = snapshot_path(run, epoch)
        path.parent.mkdir(exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_atomic(tensors, path, metadata={"branch": loop.method.eval_branch, "epoch": str(epoch)})
    D.barrier(loop.info)


SCHEDULED = ("lr", "wd", "tau", "teacher_temp")  # logged as of the last step, not averaged


class StepLog:
    """Averages the logged terms over ``log_every`` steps (and over ranks) into one line."""

    def __init__(self, log: RunLog, every: int, info: D.DistInfo, bar):
        self.log, self.every, self.info, self.bar = log, every, info, bar  # bar: the tqdm bar (rank 0)
        self.sums: dict[str, float] = {}
        self.n = 0
        self.t0, self.images = time.perf_counter(), 0

    def add(self, values: dict[str, float], images: int, step: int, epoch: int, total: int) -> None:
        schedules = {k: values[k] for k in SCHEDULED if k in values}
        for k, v in values.items():
            if k not in schedules:
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.images += images * self.info.world_size
        if step % self.every == 0 or step == total:
            means = D.all_reduce_mean({k: v / self.n for k, v in self.sums.items()}, self.info)
            record = {"kind": "train", "step": step, "epoch": epoch, **schedules, **means}
            record["images_per_s"] = self.images / max(time.perf_counter() - self.t0, 1e-9)
            self.log.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            self.sums, self.n, self.t0, self.images = {}, 0, time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)


def run_epoch(loop: Loop, dataset: ViewsDataset, epoch: int, log: RunLog, steps: StepLog, run: Path) -> None:
    """The rest of ``epoch`` from the loop's step: steps, NaN guard, logs, checkpoints."""
    data, train, info = loop.s.data, loop.s.train, loop.info
    sampler = EpochBatchSampler(len(dataset), data.batch_size, epoch, train.seed, info.world_size,
                                info.rank, loop.steps_per_epoch * data.batch_size * info.world_size,
                                start=loop.step - epoch * loop.steps_per_epoch)  # fmt: skip
    # the loader's own generator: drawing its worker base seed from the global RNG would shift
    # what dropout (LoDisc's heads) draws after a resume mid-epoch; views are seeded per sample
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=data.workers,
                        pin_memory=info.device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(train.seed * 1_000_003 + epoch))  # fmt: skip
    for batch in loader:
        values = train_step(loop, batch)
        if values is None:
            log.write({"kind": "nan", "step": loop.step, "consecutive": loop.nan_skips})
            if loop.nan_skips > train.max_nan_skips:
                raise TrainingError(
                    f"{run}: loss not finite for {loop.nan_skips} steps in a row at step {loop.step}"
                )
            continue
        steps.add(values, len(batch["index"]), loop.step, epoch, loop.total)
        if loop.step % train.ckpt_every == 0 or loop.step == loop.total:
            _save(loop, run)


def train(shards: list[str], settings: RunSettings, run: str | Path, resume: bool = False) -> Path:
    """Train ``settings.method`` on ``shards`` into the folder ``run``; returns the checkpoint
    path. The builds it reads stay locked against a rebuild while it runs (``maskio.buildlock``)."""
    with reading_builds(shards):
        return _train(shards, settings, Path(run), resume)


def _train(shards: list[str], s: RunSettings, run: Path, resume: bool) -> Path:
    info = D.init_distributed()
    check_config(s, info)
    _set_determinism(s.train, info)
    method_cls = METHODS[s.method]
    check_model_memory(s)
    try:
        method = build_method(s, init=True)  # a resume then overwrites these weights
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    records = load_records(shards, s, run, info)
    spe = steps_per_epoch(len(records), s.data.batch_size, info.world_size, s.data.samples_per_epoch)
    if spe == 0:
        raise TrainingError(
            f"{shards[0]}: {len(records)} samples are fewer than one global batch "
            f"({s.data.batch_size} x {info.world_size} processes)"
        )
    try:
        method_cls.check_data(s, len(records))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    ckpt = _prepare_run_dir(run, s, resume, info)
    loop = build_loop(method, s, info, spe, run_precision(s.train.amp, ckpt, info))
    if ckpt is not None:
        restore(loop, ckpt, run)
    views = method_cls.view_specs(s)
    dataset = ViewsDataset(records, views, s.train.seed, masks=method_cls.uses_masks(s),
                           crop_masks=method_cls.reads_masks(s))  # fmt: skip
    log = RunLog(run, info.main)
    if info.main and loop.step == 0:
        log.write({"kind": "start", "step": 0, "samples": len(records), "steps_per_epoch": spe,
                   "total_steps": loop.total, "views": len(views), "amp": loop.amp})  # fmt: skip
    bar = None
    if info.main:
        from tqdm import tqdm

        bar = tqdm(total=loop.total, initial=loop.step, unit="step", dynamic_ncols=True, desc=s.method)
    try:
        _run_epochs(loop, records, dataset, log, StepLog(log, s.train.log_every, info, bar), run)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    D.shutdown(info)
    if loop.nan_skips:  # the run ended inside a run of non-finite losses: it did not train to the end
        raise TrainingError(
            f"{run}: the last {loop.nan_skips} of {loop.total} steps were skipped (loss not finite): "
            f"no update since step {loop.step - loop.nan_skips}"
        )
    return run_checkpoint_path(run)


def _run_epochs(
    loop: Loop, records: Records, dataset: ViewsDataset, log: RunLog, steps: StepLog, run: Path
) -> None:
    """From the loop's step to the end: each epoch's hook, steps, monitor and snapshot."""
    s, info, spe = loop.s, loop.info, loop.steps_per_epoch
    loop.method.train()
    for epoch in range(loop.step // spe, s.train.epochs):
        if loop.step == epoch * spe:  # a fresh epoch, not a resume inside one
            logged = loop.method.before_epoch(loop.progress, records, info)
            if logged and info.main:
                log.write({"kind": "epoch", "step": loop.step, "epoch": epoch, **logged})
        run_epoch(loop, dataset, epoch, log, steps, run)
        every = s.monitor.knn_every
        if every and (epoch + 1) % every == 0 and records.labelled:
            scored = loop.method.branch_backbone(loop.method.eval_branch)
            result = knn_monitor(scored, records, s, info)
            if result is not None:
                log.write({"kind": "monitor", "step": loop.step, "epoch": epoch, **result})
        if epoch + 1 in s.train.snapshot_epochs:
            save_snapshot(loop, run, epoch + 1)
    if loop.last_saved != loop.step:
        _save(loop, run)
