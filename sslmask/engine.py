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
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from maskio.records import Records, index_cached
from sslmask import distributed as D
from sslmask.backbones import normalize
from sslmask.checkpoint import CheckpointError, load_file, run_checkpoint_path, save_atomic
from sslmask.config import ConfigError, diff
from sslmask.dataset import EpochBatchSampler, ViewsDataset, steps_per_epoch
from sslmask.eval.features import extract_features
from sslmask.eval.knn import knn_eval
from sslmask.methods import METHODS, build_method
from sslmask.optim import OPTIMIZERS, build_optimizer
from sslmask.schedules import cosine_ramp, warmup_cosine
from sslmask.transforms import byol_views

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
TB_DIR = "tb"
INDEX_CACHE = "shard-index.npz"


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


def _set_determinism(cfg: dict[str, Any], info: D.DistInfo) -> None:
    seed = cfg["train"]["seed"]
    random.seed(seed + info.rank)
    torch.manual_seed(seed + info.rank)
    if cfg["train"]["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _prepare_run_dir(run: Path, cfg: dict[str, Any], resume: bool, info: D.DistInfo) -> dict[str, Any] | None:
    """Create or check the run folder; the checkpoint to resume from, if any."""
    ckpt_path = run_checkpoint_path(run)
    saved_cfg = run / CONFIG_FILE
    if resume and ckpt_path.exists():
        ckpt = load_file(ckpt_path)
        changed = [k for k in diff(ckpt["config"], cfg) if k != "train.epochs"]
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
        tmp = saved_cfg.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tmp.replace(saved_cfg)
    D.barrier(info)
    return None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint: the resumed run logs those steps again."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


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


def knn_monitor(backbone: torch.nn.Module, records: Records, cfg: dict[str, Any], device) -> dict[str, float]:
    """k-NN top-1 of held-out training samples against the rest (labels never train the model)."""
    n = len(records)
    held = torch.randperm(n, generator=torch.Generator().manual_seed(0))[
        : max(1, int(n * cfg["monitor"]["knn_holdout"]))
    ]
    feats, labels = extract_features(backbone, records, cfg["data"]["image_size"], workers=0, device=device)
    is_query = torch.zeros(n, dtype=torch.bool)
    is_query[held] = True
    k = cfg["monitor"]["knn_k"]
    res = knn_eval(feats[~is_query], labels[~is_query], feats[is_query], labels[is_query], ks=(k,))
    return {"knn_top1": res[f"k={k}"]["top1"]}


def train(shards: list[str], cfg: dict[str, Any], run: str | Path, resume: bool = False) -> Path:
    """Train ``cfg["method"]`` on ``shards`` into the folder ``run``; returns the checkpoint path."""
    run = Path(run)
    info = D.init_distributed()
    if cfg["method"] not in METHODS:
        raise ConfigError(f"unknown method {cfg['method']!r}; choose from {', '.join(METHODS)}")
    _set_determinism(cfg, info)
    data_cfg, t_cfg, o_cfg = cfg["data"], cfg["train"], cfg["optim"]
    try:
        method = build_method(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if o_cfg["name"] not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {o_cfg['name']!r}; choose from {', '.join(OPTIMIZERS)}")
    if t_cfg["amp"] not in ("bf16", "fp16", "none"):
        raise ConfigError(f"train.amp must be bf16, fp16 or none, got {t_cfg['amp']!r}")
    if t_cfg["sync_bn"] and info.world_size > 1 and info.device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    needs_masks = METHODS[cfg["method"]].needs_masks
    if info.main:
        records = index_cached(shards, needs_masks, run / INDEX_CACHE)
    D.barrier(info)
    if not info.main:
        records = index_cached(shards, needs_masks, run / INDEX_CACHE)  # reads rank 0's cache
    spe = steps_per_epoch(
        len(records), data_cfg["batch_size"], info.world_size, data_cfg["samples_per_epoch"]
    )
    if spe == 0:
        raise TrainingError(
            f"{shards[0]}: {len(records)} samples are fewer than one global batch "
            f"({data_cfg['batch_size']} x {info.world_size} processes)"
        )
    ckpt = _prepare_run_dir(run, cfg, resume, info)

    if t_cfg["sync_bn"] and info.world_size > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    memory_format = torch.channels_last if t_cfg["channels_last"] else torch.contiguous_format
    method = method.to(info.device, memory_format=memory_format)
    global_batch = data_cfg["batch_size"] * info.world_size
    base_lr = o_cfg["lr"] * global_batch / 256
    optimizer = build_optimizer(
        o_cfg["name"], method.online_modules(), base_lr, o_cfg["weight_decay"], o_cfg["momentum"]
    )
    for group in optimizer.param_groups:
        group["base_lr"] = base_lr
    amp = t_cfg["amp"] if info.device.type == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    step = 0
    if ckpt is not None:
        try:
            method.load_state_dict(ckpt["method"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{run_checkpoint_path(run)}: does not fit this run ({exc})") from exc
        step = int(ckpt["step"])
        _restore_rng(ckpt["rng"])
    total = spe * t_cfg["epochs"]
    warmup = spe * o_cfg["warmup_epochs"]

    model: torch.nn.Module = method
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    forward = torch.compile(model) if t_cfg["compile"] else model
    views = byol_views(data_cfg["image_size"], data_cfg["min_fg"], data_cfg["crop_min_scale"])
    dataset = ViewsDataset(records, views, t_cfg["seed"])
    log = RunLog(run, info.main)
    if info.main and step == 0:
        log.write(
            {
                "kind": "start",
                "step": 0,
                "samples": len(records),
                "steps_per_epoch": spe,
                "total_steps": total,
            }
        )

    last_saved = step

    def save() -> None:
        nonlocal last_saved
        last_saved = step
        if info.main:
            state = {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "config": cfg,
                "rng": _rng_state(),
            }
            save_atomic(state, run_checkpoint_path(run))
        D.barrier(info)

    progress = None
    if info.main:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc=cfg["method"])
    nan_skips = 0
    window_t, window_n = time.perf_counter(), 0
    sums: dict[str, float] = {}
    method.train()
    try:
        for epoch in range(step // spe, t_cfg["epochs"]):
            sampler = EpochBatchSampler(
                len(records),
                data_cfg["batch_size"],
                epoch,
                t_cfg["seed"],
                info.world_size,
                info.rank,
                spe * global_batch,
                start=step - epoch * spe,
            )
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=data_cfg["workers"],
                pin_memory=info.device.type == "cuda",
                persistent_workers=False,
            )
            for batch in loader:
                lr = warmup_cosine(base_lr, step, total, warmup, o_cfg["final_lr"] * global_batch / 256)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs = {}
                for v in range(METHODS[cfg["method"]].num_views):
                    x = batch[f"view{v}"].to(info.device, non_blocking=True)
                    inputs[f"view{v}"] = normalize(x).contiguous(memory_format=memory_format)
                    inputs[f"mask{v}"] = batch[f"mask{v}"].to(info.device, non_blocking=True).float() / 255
                with torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = forward(inputs, step, total)
                loss = out["loss"]
                if not D.all_true(bool(torch.isfinite(loss)), info):
                    nan_skips += 1
                    if info.main:
                        log.write({"kind": "nan", "step": step, "consecutive": nan_skips})
                    if nan_skips > t_cfg["max_nan_skips"]:
                        raise TrainingError(
                            f"{run}: loss not finite for {nan_skips} steps in a row at step {step}"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    continue
                nan_skips = 0
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if o_cfg["grad_clip"] > 0:
                    scaler.unscale_(optimizer)
                    params = [p for m in method.online_modules() for p in m.parameters()]
                    torch.nn.utils.clip_grad_norm_(params, o_cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                tau = cosine_ramp(cfg["ema"]["tau_base"], step, total)
                method.momentum_update(tau)
                step += 1
                window_n += len(batch["index"]) * info.world_size
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["_n"] = sums.get("_n", 0.0) + 1
                if step % t_cfg["log_every"] == 0 or step == total:
                    n = sums.pop("_n")
                    values = D.all_reduce_mean({k: v / n for k, v in sums.items()}, info)
                    elapsed = time.perf_counter() - window_t
                    record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr, "tau": tau, **values}
                    record["images_per_s"] = window_n / max(elapsed, 1e-9)
                    log.write(record)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{values['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}"
                        )
                    sums, window_t, window_n = {}, time.perf_counter(), 0
                if progress is not None:
                    progress.update(1)
                if step % t_cfg["ckpt_every"] == 0 or step == total:
                    save()
            every = cfg["monitor"]["knn_every"]
            if every and (epoch + 1) % every == 0 and records.labelled and info.main:
                result = knn_monitor(method.backbone, records, cfg, info.device)
                log.write({"kind": "monitor", "step": step, "epoch": epoch, **result})
        if last_saved != step:
            save()
    finally:
        if progress is not None:
            progress.close()
        log.close()
    D.shutdown(info)
    return run_checkpoint_path(run)
