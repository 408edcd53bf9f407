"""The GPU check: every CUDA path of the project in one command, with one table and one JSON.

    python benchmarks/gpu_check.py --out gpu-check.json              # on a machine with one GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check.json   # the same code on CPU, tiny

It runs, in order (docs/DESIGN "The GPU check"; the whole check fits in 8 minutes on an H100):
1. ``--method deep`` builds, in-process (``--executor local``: the GPU machine has no Ray), of
   ``--images`` synthetic ImageNet-sized JPEGs made here, with a ResNet-18 head: images/s end to
   end (JPEG in, mask PNG in the tar), with the JPEGs decoded on the device (nvJPEG) and by PIL
   in the worker. Every sample must record the device it ran on, and on a GPU that is cuda.
2. HARL and BYOL training steps, ResNet-50, ``--batch`` images, bf16 autocast, channels_last:
   images/s and the HARL/BYOL step-time ratio (on fixed synthetic batches); DINO (multi-crop)
   and MoCo v3 steps with ViT-S/16 at batch 128.
3. HARL's step in each precision (issue 43): float32, bf16 and fp16 autocast with
   channels_last, and bf16 compiled (``torch.compile``; its compile time is reported apart):
   images/s and peak GPU memory of each.
4. A 200-step HARL training run (``sslmask train`` on the step-1 build), SIGKILLed at step ~120
   and resumed with ``--resume auto``: it must reach its last step.
5. Everything, with the GPU's name and the torch and CUDA versions, into ``--out``.

``--dry-run`` runs the same functions at a tiny size on the CPU (the test suite does), so a
typo cannot waste the few minutes a GPU machine is lent for. A failed check prints its reason
and the script exits 1 after writing what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_step import precision_args, step_times  # noqa: E402 -- a sibling benchmark, found through sys.path

from maskgen.cli import main as maskgen  # noqa: E402
from maskgen.methods.deep.model import SaliencyNet, save_head  # noqa: E402
from sslmask.backbones import build_backbone  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How big each part of the check is: the real check, or the dry run on CPU."""

    images: int
    width: int
    height: int
    head_arch: str
    short_side: int
    train_arch: str
    train_batch: int
    train_size: int
    steps: int  # timed training steps per method
    run_steps: int  # the killed-and-resumed run
    kill_at: int
    run_arch: str
    run_batch: int
    run_size: int
    vit_arch: str
    vit_batch: int
    vit_sets: tuple[str, ...] = ()


FULL = Sizes(
    5000, 500, 375, "resnet18", 224, "resnet50", 256, 224, 10, 200, 120, "resnet18", 64, 112, "vit_small", 128
)
DRY = Sizes(
    24,
    80,
    60,
    "resnet_tiny",
    48,
    "resnet_tiny",
    4,
    32,
    2,
    8,
    4,
    "resnet_tiny",
    4,
    32,
    "vit_micro",
    4,
    (
        "dino.out_dim=64",
        "dino.local_crops=2",
        "model.proj_hidden=32",
        "model.pred_hidden=32",
        "scfs.vit_blocks=[1, 2]",
        "scfs.head_bottleneck=8",
        "scfs.head_hidden=32",
        "scfs.head_dim=16",
    ),
)


def _photo(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth background, an object with texture, JPEG quality 90."""
    from io import BytesIO

    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    img = base + 40 * np.sin(xx[..., None] / rng.uniform(30, 90) + rng.uniform(0, 6, 3))
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.15, 0.35) * height, rng.uniform(0.15, 0.35) * width
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 20, (int(inside.sum()), 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    buf = BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_photo(args: tuple[int, int, int, str]) -> None:
    seed, width, height, path = args
    Path(path).write_bytes(_photo(seed, width, height))


def make_photos(folder: Path, sizes: Sizes) -> Path:
    """``sizes.images`` JPEGs in two class folders (``--source folder --class-folders``)."""
    jobs = []
    for i in range(sizes.images):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        jobs.append((i, sizes.width, sizes.height, str(sub / f"img{i:05d}.jpg")))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_photo, jobs, chunksize=64))
    return folder


def make_head(path: Path, sizes: Sizes) -> Path:
    """A head with a random backbone: speed does not depend on the weights."""
    torch.manual_seed(0)
    net = SaliencyNet(build_backbone(sizes.head_arch, 32))
    save_head(net, path, {"arch": sizes.head_arch, "out_stride": 32, "short_side": sizes.short_side})
    return path


def recorded_devices(out: Path) -> dict[str, int]:
    """How many samples of a build say they ran on each device (from every sample's json)."""
    counts: dict[str, int] = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    device = json.loads(tar.extractfile(member).read())["method_params"].get("device")
                    counts[str(device)] = counts.get(str(device), 0) + 1
    return counts


def check_build(photos: Path, head: Path, work: Path, decode: str, device: str) -> dict[str, Any]:
    """One in-process ``--method deep`` build of the photos; its images/s and recorded devices."""
    out = work / f"build-{decode}"
    t0 = time.perf_counter()
    rc = maskgen(["build", "--source", "folder", "--root", str(photos), "--class-folders", "--method", "deep",
                  "--head", str(head), "--param", f"decode={decode}", "--out", str(out), "--executor", "local",
                  "--shard-size", "1000", "--no-progress", "--overwrite"])  # fmt: skip
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"decode": decode, "ok": False, "reason": f"maskgen build exited {rc}"}
    report = json.loads((out / "report.json").read_text())
    devices = recorded_devices(out)
    ok = set(devices) == {device} and report["n_errors"] == 0
    return {
        "decode": decode,
        "ok": ok,
        "reason": "" if ok else f"recorded devices {devices}, {report['n_errors']} errors",
        "images": report["n_images"],
        "images_per_second": report["images_per_second"],
        "wall_seconds": round(wall, 2),
        "recorded_devices": devices,
        "ran_on": report.get("ran_on"),
        "out": str(out),
    }


TRAIN_METHODS = ("byol", "harl", "mocov2", "segas")


def check_train_steps(sizes: Sizes, device: str) -> dict[str, Any]:
    """HARL vs BYOL and mask-aware SegAS (past its warm-up) vs MoCo v2 step times, interleaved,
    bf16 + channels_last on a GPU."""
    args = SimpleNamespace(arch=sizes.train_arch, batch=sizes.train_batch, size=sizes.train_size,
                           steps=sizes.steps, device=device, amp="bf16" if device == "cuda" else "none",
                           channels_last=device == "cuda", set=["segas.mask_mode=salient"])  # fmt: skip
    med: dict[str, list[float]] = {name: [] for name in TRAIN_METHODS}
    for _ in range(3):
        for name in med:
            med[name].append(statistics.median(step_times(name, args)))
    seconds = {name: statistics.median(times) for name, times in med.items()}
    out = {"arch": sizes.train_arch, "batch": sizes.train_batch, "size": sizes.train_size, "amp": args.amp,
           "channels_last": args.channels_last, "ok": True}  # fmt: skip
    for name in TRAIN_METHODS:
        out[f"{name}_images_per_second"] = round(sizes.train_batch / seconds[name], 1)
    out["harl_over_byol_step_time"] = round(seconds["harl"] / seconds["byol"], 3)
    out["segas_over_mocov2_step_time"] = round(seconds["segas"] / seconds["mocov2"], 3)
    return out


VIT_METHODS = ("dino", "scfs", "mocov3")


def check_vit_steps(sizes: Sizes, device: str) -> dict[str, Any]:
    """DINO (multi-crop: 2 x 224 + 8 x 96 px), SCFS on DINO (mask-aware, blocks 4/8/12 searched)
    and MoCo v3 steps with ViT-S/16, bf16 on a GPU; SCFS's step time against DINO's (goal <= 1.35)."""
    args = SimpleNamespace(arch=sizes.vit_arch, batch=sizes.vit_batch, size=sizes.train_size if device == "cpu"
                           else 224, steps=sizes.steps, device=device, amp="bf16" if device == "cuda" else "none",
                           channels_last=False, set=[*sizes.vit_sets, "scfs.mask_mode=key_query_gate"])  # fmt: skip
    out: dict[str, Any] = {"arch": sizes.vit_arch, "batch": sizes.vit_batch, "amp": args.amp, "ok": True}
    seconds = {}
    for name in VIT_METHODS:
        seconds[name] = statistics.median(step_times(name, args))
        out[f"{name}_images_per_second"] = round(sizes.vit_batch / seconds[name], 1)
    out["scfs_over_dino_step_time"] = round(seconds["scfs"] / seconds["dino"], 3)
    return out


GPU_PRECISIONS = ("fp32-cl", "bf16-cl", "fp16-cl", "bf16-cl-compile")
CPU_PRECISIONS = ("fp32", "bf16", "fp16")  # the dry run: every autocast path, no compile (minutes on CPU)


def check_precisions(sizes: Sizes, device: str) -> dict[str, Any]:
    """HARL's step (the training-step check's size) in each precision: images/s and peak memory."""
    base = SimpleNamespace(arch=sizes.train_arch, batch=sizes.train_batch, size=sizes.train_size,
                           steps=sizes.steps, device=device, amp="none", channels_last=False, set=[])  # fmt: skip
    out: dict[str, Any] = {"method": "harl", "arch": sizes.train_arch, "batch": sizes.train_batch, "ok": True}
    for mode in GPU_PRECISIONS if device == "cuda" else CPU_PRECISIONS:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        times = step_times("harl", precision_args(base, mode))
        out[mode] = {
            "images_per_second": round(sizes.train_batch / statistics.median(times), 1),
            "first_steps_s": round(time.perf_counter() - t0 - sum(times), 1),  # warm-up (and compile)
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        }
    return out


def _last_step(run: Path) -> int:
    """The last step in ``log.jsonl`` (a torn last line is skipped)."""
    step = -1
    log = run / "log.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", -1)))
            except (ValueError, AttributeError):
                continue
    return step


def check_kill_resume(shards: Path, sizes: Sizes, work: Path, device: str) -> dict[str, Any]:
    """A HARL run SIGKILLed at step ~``kill_at``, then resumed: it must reach its last step."""
    run = work / "harl-run"
    overrides = [f"model.arch={sizes.run_arch}", f"data.batch_size={sizes.run_batch}",
                 f"data.image_size={sizes.run_size}", f"data.samples_per_epoch={sizes.run_batch * sizes.run_steps}",
                 "train.epochs=1", f"train.ckpt_every={max(1, sizes.kill_at // 5)}", "train.log_every=1",
                 "data.workers=4", "train.amp=bf16",
                 f"train.channels_last={str(device == 'cuda').lower()}"]  # fmt: skip
    cmd = [sys.executable, "-m", "sslmask.cli", "train", str(shards), "--method", "harl", "--out", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and _last_step(run) < sizes.kill_at and time.time() < deadline:
        time.sleep(0.05)
    killed_at = _last_step(run)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--resume", "auto"], env=env, capture_output=True, text=True)
    final = _last_step(run)
    ok = res.returncode == 0 and final >= sizes.run_steps and 0 < killed_at < sizes.run_steps
    return {
        "steps": sizes.run_steps,
        "killed_at_step": killed_at,
        "final_step": final,
        "resume_seconds": round(time.perf_counter() - t0, 1),
        "ok": ok,
        "reason": "" if ok else (res.stderr.strip().splitlines() or ["killed too late or never resumed"])[-1],
    }


def environment(device: str) -> dict[str, Any]:
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def print_table(result: dict[str, Any]) -> None:
    env = result["environment"]
    print(f"GPU check on {env['gpu'] or 'CPU (dry run)'}, torch {env['torch']}, CUDA {env['cuda']}")
    print(f"{'check':<52}{'result':>22}  ok / goal")
    for b in result["builds"]:
        rate = f"{b.get('images_per_second') or 0:.1f} images/s"
        print(f"{'deep build, ' + b['decode'] + ' decode, ' + str(b.get('images', 0)) + ' JPEGs':<52}{rate:>22}  "
              f"{'yes' if b['ok'] else 'NO: ' + b['reason']}")  # fmt: skip
    t = result["train_steps"]
    for name in TRAIN_METHODS:
        print(f"{name.upper() + ' step, ' + t['arch'] + ', batch ' + str(t['batch']):<52}"
              f"{str(t[name + '_images_per_second']) + ' images/s':>22}  yes")  # fmt: skip
    ratio = t["harl_over_byol_step_time"]
    print(f"{'HARL / BYOL step time (goal <= 1.05)':<52}{ratio:>22}  {'met' if ratio <= 1.05 else 'missed'}")
    print(f"{'SegAS (salient) / MoCo v2 step time (no goal)':<52}{t['segas_over_mocov2_step_time']:>22}  yes")
    v = result["vit_steps"]
    for name in VIT_METHODS:
        print(f"{name.upper() + ' step, ' + v['arch'] + ', batch ' + str(v['batch']):<52}"
              f"{str(v[name + '_images_per_second']) + ' images/s':>22}  yes")  # fmt: skip
    ratio = v["scfs_over_dino_step_time"]
    print(f"{'SCFS / DINO step time (goal <= 1.35)':<52}{ratio:>22}  {'met' if ratio <= 1.35 else 'missed'}")
    pr = result["precisions"]
    for mode, row in pr.items():
        if isinstance(row, dict):
            peak = f", peak {row['peak_gib']} GiB" if row["peak_gib"] is not None else ""
            print(f"{'HARL step, ' + pr['arch'] + ', ' + mode + peak:<52}"
                  f"{str(row['images_per_second']) + ' images/s':>22}  yes")  # fmt: skip
    k = result["kill_resume"]
    print(f"{'HARL run killed at step ' + str(k['killed_at_step']) + ', resumed':<52}"
          f"{'reached step ' + str(k['final_step']):>22}  {'yes' if k['ok'] else 'NO: ' + k['reason']}")  # fmt: skip
    print(f"total {result['seconds']:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-check.json", help="Where the JSON goes.")
    ap.add_argument("--dry-run", action="store_true", help="The same code on the CPU at a tiny size.")
    ap.add_argument("--work", help="Scratch folder (default: a temporary one).")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if not args.dry_run and device != "cuda":
        print("gpu_check: no CUDA device here; use --dry-run to check the code on CPU", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work) as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", sizes)
        head = make_head(work / "head.safetensors", sizes)
        builds = [check_build(photos, head, work, decode, device) for decode in ("device", "pil")]
        result = {"environment": environment(device), "sizes": sizes.__dict__, "builds": builds}
        result["train_steps"] = check_train_steps(sizes, device)
        result["vit_steps"] = check_vit_steps(sizes, device)
        result["precisions"] = check_precisions(sizes, device)
        built = [b for b in builds if "out" in b]
        result["kill_resume"] = (
            check_kill_resume(Path(built[0]["out"]), sizes, work, device)
            if built
            else {"ok": False, "reason": "no build to train on", "killed_at_step": -1, "final_step": -1}
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(b["ok"] for b in builds) and result["kill_resume"]["ok"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
