"""sslmask train/eval/export through the real CLI: outputs, errors, exact resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sslmask.cli import main
from sslmask.progress import Progress
from sslmask.schedules import cosine_ramp

TINY = ["--config", "cpu-demo", "--set", "data.image_size=48", "--set", "data.batch_size=8",
        "--set", "data.workers=0", "--set", "model.proj_hidden=64", "--set", "model.pred_hidden=64",
        "--set", "model.proj_dim=32", "--set", "train.log_every=1"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def sslmask_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslmask.cli", *args]


def _log(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_harl_train_export_and_knn_cli(sample_build, tmp_path, capsys):
    run = tmp_path / "harl"
    args = ["train", str(sample_build), "--method", "harl", "--out", str(run), *TINY]
    assert main([*args, "--set", "train.epochs=2", "--set", "monitor.knn_every=1"]) == 0
    assert {p.name for p in run.iterdir()} >= {"checkpoint.pt", "config.yaml", "log.jsonl", "tb"}
    train_log = _log(run)
    assert [r["step"] for r in train_log] == list(range(1, 11))  # 42 samples // 8 = 5 steps x 2 epochs
    for key in (
        "loss",
        "loss_fg",
        "loss_bg",
        "loss_global",
        "alpha",
        "lambda",
        "fallback",
        "z_std",
        "lr",
        "tau",
    ):
        assert all(key in r for r in train_log), key
    # the entry of step k logs the coefficients used for it (computed at k - 1 of 10)
    assert [r["alpha"] for r in train_log] == pytest.approx(
        [cosine_ramp(0.7, k, 10) for k in range(10)], rel=1e-6
    )
    assert 0 <= train_log[0]["fallback"] <= 1
    assert len(_log(run, "monitor")) == 2 and 0 <= _log(run, "monitor")[0]["knn_top1"] <= 100
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["harl"]["alpha_base"] == 0.7

    assert main(["export", str(run), "--out", str(tmp_path / "bb.pt")]) == 0
    capsys.readouterr()
    out_json = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "bb.pt"), "--train", str(sample_build),
                 "--val", str(sample_build), "--image-size", "48", "--workers", "0", "--out", str(out_json)]) == 0  # fmt: skip
    result = json.loads(out_json.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["train"] == result["val"] == 42 and set(result["accuracy"]) == {"k=10", "k=20", "k=30"}
    # the memory bank holds the queries themselves: k-NN must find them
    assert result["accuracy"]["k=10"]["top1"] > 50
    assert main(["eval", "linear", "--checkpoint", "random", "--arch", "resnet_tiny", "--train", str(sample_build),
                 "--val", str(sample_build), "--image-size", "48", "--workers", "0", "--epochs", "5"]) == 0  # fmt: skip


def test_byol_trains_and_refuses_to_overwrite_a_run(sample_build, tmp_path, capsys):
    run = tmp_path / "byol"
    args = [
        "train",
        str(sample_build),
        "--method",
        "byol",
        "--out",
        str(run),
        *TINY,
        "--set",
        "train.epochs=1",
    ]
    assert main(args) == 0
    assert all("loss_fg" not in r for r in _log(run)) and len(_log(run)) == 5
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds a run; use --resume auto" in capsys.readouterr().err
    # a finished run resumed with more epochs continues from its last step
    assert main([*args, "--set", "train.epochs=2", "--resume", "auto"]) == 0
    assert [r["step"] for r in _log(run)][-1] == 10


def test_diverging_run_stops_with_a_clear_error(sample_build, tmp_path, capsys):
    run = tmp_path / "nan"
    args = ["train", str(sample_build), "--method", "byol", "--out", str(run), *TINY, "--set", "optim.name=sgd",
            "--set", "optim.lr=1e30", "--set", "optim.warmup_epochs=0", "--set", "train.max_nan_skips=2"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss not finite for 3 steps in a row" in err
    assert len(_log(run, "nan")) == 3


def test_seed_flag_and_print_config(capsys):
    assert (
        main(
            [
                "train",
                "x",
                "--method",
                "harl",
                "--out",
                "r",
                "--seed",
                "5",
                "--deterministic",
                "--print-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "seed: 5" in out and "deterministic: true" in out and "alpha_base: 0.7" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope.tar", "--method", "byol"], "nope.tar: no such shard"),
        (["{tmp}", "--method", "byol"], "no complete maskgen shards in this folder"),
        (["{build}", "--method", "simclr"], "unknown method 'simclr'"),
        (["{build}", "--method", "harl", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["{build}", "--method", "harl", "--set", "optim.lr=fast"], "optim.lr must be float"),
        (["{build}", "--method", "harl", "--set", "model.arch=vit"], "unknown backbone 'vit'"),
        (
            ["{build}", "--method", "harl", "--config", "{tmp}/missing.yaml"],
            "missing.yaml: cannot read config",
        ),
        (["{plain}", "--method", "harl"], "has no mask.png; this method needs masks"),
        (["{build}", "--method", "harl", "--set", "data.batch_size=64"], "fewer than one global batch"),
    ],
)
def test_bad_input_is_a_one_line_error(sample_build, tmp_path, capsys, args, message):
    import io
    import tarfile

    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        data = (sample_build / "shards" / "maskgen-000000.tar").read_bytes()[:10]
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fill = {"{tmp}": str(tmp_path), "{build}": str(sample_build), "{plain}": str(plain)}
    argv = []
    for a in args:
        for k, v in fill.items():
            a = a.replace(k, v)
        argv.append(a)
    rc = main(["train", *argv, "--out", str(tmp_path / "run"), "--set", "data.workers=0"])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1, err


def _run_dir_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["method"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# what each baseline needs to be small (DINO: a 64-way head, 2 local crops)
BASELINE_SETS = {
    "harl": [],
    "dino": ["--set", "dino.out_dim=64", "--set", "dino.local_crops=2", "--set", "dino.local_size=24"],
    "mocov2": ["--set", "mocov2.queue=64"],
    "mocov3": [],
    "scfs": _sets(
        "dino.out_dim=64",
        "dino.local_crops=2",
        "dino.local_size=24",
        "scfs.head_bottleneck=8",
        "scfs.head_hidden=32",
        "scfs.head_dim=16",
        "scfs.mask_mode=key_query_gate",
    ),  # fmt: skip
    "lodisc": _sets("model.arch=vit_micro", "lodisc.mode=product"),
    # re-clusters at the start of epochs 2-5: a resume from the first checkpoints crosses them
    "segas": _sets(
        "mocov2.queue=64", "segas.warmup_epochs=2", "segas.prototypes=[6, 3]", "segas.mask_mode=salient"
    ),
}


@pytest.mark.parametrize("method", ["dino", "mocov2", "mocov3"])
def test_baselines_train_on_a_build_and_on_class_folders(method, sample_build, tmp_path):
    from PIL import Image

    folder = tmp_path / "folders"
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 36), (40 * i, 100 * c, 90)).save(folder / f"class{c}" / f"{i}.png")
    for data in (sample_build, folder):
        run = tmp_path / f"{method}-{data.name}"
        args = ["train", str(data), "--method", method, "--out", str(run), *TINY, *BASELINE_SETS[method],
                "--set", "train.epochs=1"]  # fmt: skip
        assert main(args) == 0
        log = _log(run)
        assert log and all(np.isfinite(r["loss"]) and "tau" in r for r in log)


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_micro"])
def test_mask_aware_scfs_trains_on_a_build_and_logs_its_fallbacks(arch, sample_build, tmp_path):
    run = tmp_path / arch
    taps = ["--set", "scfs.vit_blocks=[1, 2]"] if arch == "vit_micro" else []
    args = ["train", str(sample_build), "--method", "scfs", "--out", str(run), *TINY, *BASELINE_SETS["scfs"],
            "--set", f"model.arch={arch}", *taps, "--set", "train.epochs=1"]  # fmt: skip
    assert main(args) == 0
    log = _log(run)
    assert len(log) == 5
    for r in log:
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(
            r["loss_dino"] + 0.5 * (r["loss_search"] + r["loss_layer_global"]), rel=1e-4
        )
        assert 0 <= r["fallback"] <= 1 and 0 <= r["gated"] <= 1
    assert any(r["gated"] > 0 for r in log)  # 24 px local crops of the sample scenes miss the object


@pytest.mark.slow
@pytest.mark.parametrize("method", ["harl", "dino", "mocov2", "mocov3", "scfs", "lodisc", "segas"])
def test_sigkilled_run_resumes_to_the_same_weights(method, sample_build, tmp_path):
    args = [
        "train",
        str(sample_build),
        "--method",
        method,
        *TINY,
        *BASELINE_SETS[method],
        "--set",
        "train.epochs=6",
        "--set",
        "train.ckpt_every=2",
        "--set",
        "train.deterministic=true",
        "--set",
        "data.workers=1",
        *(["--set", "train.amp=bf16"] if method == "harl" else []),
    ]  # fmt: skip  (bf16 resumes exactly too)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight = tmp_path / "straight"
    subprocess.run(sslmask_cmd(*args, "--out", str(straight)), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(sslmask_cmd(*args, "--out", str(killed)), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoint.pt").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 30
    subprocess.run(
        sslmask_cmd(*args, "--out", str(killed), "--resume", "auto"), check=True, env=env, capture_output=True
    )
    a, b = _run_dir_weights(straight), _run_dir_weights(killed)
    assert a.keys() == b.keys()
    extra_a, extra_b = a.pop("_extra_state", None), b.pop("_extra_state", None)  # SegAS's clusters
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if extra_a is not None:
        assert extra_a["epoch"] == extra_b["epoch"] == 5 and torch.equal(extra_a["labels"], extra_b["labels"])
        assert all(
            torch.equal(x, y) for x, y in zip(extra_a["prototypes"], extra_b["prototypes"], strict=True)
        )
    assert [r["step"] for r in _log(killed)] == list(range(1, 31))  # lines past the checkpoint dropped


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """DDP's gradient is the mean of the ranks' gradients, each with its own batch statistics:
    one process reproduces it by accumulating the two halves of the global batch."""
    from ddp_reference import global_batch, make_method

    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    subprocess.run([*torchrun, str(REPO / "tests" / "ddp_worker.py"), str(out)], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    ddp = torch.load(out, weights_only=True)

    method = make_method()
    batch = global_batch()
    halves = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    loss = sum(method(h, Progress(3, 10, 10))["loss"] for h in halves) / 2
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys() and len(grads) > 20
    for name, g in grads.items():
        torch.testing.assert_close(
            ddp["grads"][name],
            g,
            rtol=1e-4,
            atol=1e-6 + 1e-4 * float(g.abs().max()),
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.slow
def _torchrun_train(build: Path, run: Path, method: str, *sets: str) -> None:
    """``sslmask train`` under torchrun, 2 CPU processes (gloo), 2 epochs of global batch 8."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [*torchrun, "-m", "sslmask.cli", "train", str(build), "--method", method, "--out", str(run), *TINY,
           *sets, "--set", "data.batch_size=4", "--set", "train.epochs=2"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_training_run(sample_build, tmp_path):
    run = tmp_path / "ddp_run"
    # under bf16 autocast (issue 43): DDP's gradient all-reduce of an autocast step, on gloo
    _torchrun_train(sample_build, run, "harl", "--set", "monitor.knn_every=1", "--set", "train.amp=bf16")
    assert _log(run, "start")[0]["amp"] == "bf16"
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 11))  # global batch 8: 5 steps per epoch
    # the k-NN monitor: each rank embedded half the samples, rank 0 logged the result
    assert [r["epoch"] for r in _log(run, "monitor")] == [0, 1]
    assert all(0 <= r["knn_top1"] <= 100 for r in _log(run, "monitor"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 10


@pytest.mark.slow
def test_torchrun_segas_clusters_on_rank_0_and_both_ranks_train_on_the_broadcast(sample_build, tmp_path):
    run = tmp_path / "ddp_segas"
    _torchrun_train(sample_build, run, "segas", *BASELINE_SETS["segas"], "--set", "segas.warmup_epochs=1")
    assert [r["epoch"] for r in _log(run, "epoch")] == [1]
    assert all("loss_hprocr2" in r for r in _log(run) if r["epoch"] == 1)
    state = torch.load(run / "checkpoint.pt", weights_only=True)["method"]["_extra_state"]
    labels = state["labels"]  # every sample, embedded half on each rank, clustered on rank 0
    assert labels.shape == (2, _log(run, "start")[0]["samples"]) and int(labels.max()) < 6
    assert len(torch.unique(labels[0])) > 1
