"""Ray paths: worker count, SIGKILL + resume, and a real two-node cluster on loopback.

All compare tars byte for byte with a reference build.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import maskgen_cmd

from maskgen.cli import main

pytestmark = pytest.mark.slow
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
BUILD = [
    "--source",
    "sample",
    "--sample-size",
    "108",
    "--shard-size",
    "12",
    "--method",
    "center",
    "--no-progress",
]


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("maskgen-*.tar"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The same build, in-process, one shard after another."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["build", *BUILD, "--out", str(out), "--executor", "local"]) == 0
    ref = tars(out)
    assert len(ref) == 10
    return ref


def build(out: Path, *extra: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(maskgen_cmd("build", *BUILD, "--out", str(out), *extra), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.parametrize("workers", ["1", "2"])
def test_worker_count_does_not_change_the_bytes(tmp_path, reference, workers):
    res = build(tmp_path / "out", "--workers", workers)
    assert res.returncode == 0, res.stderr
    assert tars(tmp_path / "out") == reference


def test_sigkill_at_random_moments_then_resume_gives_identical_tars(tmp_path, reference):
    out = tmp_path / "out"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen(maskgen_cmd("build", *BUILD, "--out", str(out), "--workers", "2"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        time.sleep(rng.uniform(1.5, 6.0) if attempt else 3.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
            kills += 1
        proc.wait()
        time.sleep(0.5)
        shards = out / "shards"
        if shards.is_dir():
            for tar in shards.glob("maskgen-*.tar"):
                # a tar under its final name is complete: either it has its stats, or it is
                # byte-identical to the reference (killed between the two renames)
                stats = tar.with_name(tar.name.replace(".tar", ".stats.json"))
                assert stats.exists() or tar.read_bytes() == reference[tar.name], tar.name
            for stats in shards.glob("*.stats.json"):
                assert json.loads(stats.read_text())["nsamples"] > 0
    assert kills >= 2, "the build finished before it could be killed; make it longer"
    res = build(out, "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert tars(out) == reference
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")], "temporaries left behind"
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 120 and report["n_errors"] == 0


def test_two_node_cluster_on_loopback(tmp_path, reference, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:")
        out = tmp_path / "out"
        res = build(out, "--ray-address", cluster.address, env=LOOPBACK)
        assert res.returncode == 0, res.stderr
        assert tars(out) == reference
        nodes = {json.loads(p.read_text())["ray_node_id"] for p in (out / "shards").glob("*.stats.json")}
        assert len(nodes) == 2, "every shard ran on one node"
        # with that cluster still up, two local builds at once each start their own private
        # instance (address="local") instead of joining it (#20.9)
        local = [subprocess.Popen(maskgen_cmd("build", *BUILD, "--out", str(tmp_path / f"local{i}")),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
        for proc in local:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert "Traceback" not in err and "Token authentication" not in err
        assert tars(tmp_path / "local0") == tars(tmp_path / "local1") == reference
    finally:
        cluster.shutdown()


def test_node_killed_mid_build_tasks_retried_on_survivor(tmp_path, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    from ray.cluster_utils import Cluster

    args = [
        "--source",
        "sample",
        "--sample-size",
        "300",
        "--shard-size",
        "10",
        "--method",
        "center",
        "--no-progress",
    ]
    ref_out = tmp_path / "ref"
    assert main(["build", *args, "--out", str(ref_out), "--executor", "local"]) == 0
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        doomed = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        proc = subprocess.Popen(maskgen_cmd("build", *args, "--out", str(out), "--ray-address", cluster.address),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **LOOPBACK})  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "shards").glob("*.stats.json"))) < 4:
            time.sleep(0.05)
        finished_before = len(list((out / "shards").glob("*.stats.json")))
        cluster.remove_node(doomed, allow_graceful=False)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert finished_before < 31, "the build ended before the node was killed"
        assert tars(out) == tars(ref_out)
        assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    finally:
        cluster.shutdown()


def test_deep_build_on_a_gpu_host_asks_ray_for_the_gpu_share(tmp_path, monkeypatch):
    """The plan of a GPU host asks Ray for ``gpu_share`` per task (read back from inside each
    task); these workers have no CUDA, so every sample records the CPU and the summary warns."""
    import io
    import logging

    import ray
    import torch
    from test_deep import _net

    from maskgen.methods.deep.model import save_head
    from maskgen.pipeline import BuildOptions, run_build

    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    head = tmp_path / "h.safetensors"
    save_head(_net(), head, {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    out = tmp_path / "out"
    opts = BuildOptions(source="sample", source_config={"sample_size": 6, "photos": False}, method="deep",
                        method_params={"head": str(head), "gpu_share": 0.5}, out=str(out), shard_size=3,
                        workers=2, progress=False)  # fmt: skip
    # Ray's view of this machine: one GPU (so a 0.5 request can be granted), 2 CPUs
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)  # fmt: skip
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the planning process "sees" one
        stream = io.StringIO()
        report = run_build(opts, stream)
    finally:
        ray.shutdown()
    for stats in sorted((out / "shards").glob("*.stats.json")):
        assert json.loads(stats.read_text())["ray_resources"] == {"CPU": 1.0, "GPU": 0.5}
    assert report["task_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert report["ran_on"] == [{"device": "cpu", "dtype": "fp32", "shards": 2}]
    import tarfile

    with tarfile.open(out / "shards" / "maskgen-000000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert meta["method_params"]["device"] == "cpu" and meta["method_params"]["dtype"] == "fp32"
    warning = [line for line in stream.getvalue().splitlines() if "warning" in line]
    assert warning == ["maskgen: warning: each task asked Ray for 0.5 GPU, but 2 shard(s) ran on the CPU "
                       "(no CUDA in the worker)"]  # fmt: skip
    assert "ran on the CPU" in (out / "report.html").read_text()


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[3]) == sid:  # field 6 of stat: session id
                pids.append(int(d))
    return pids


def _listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of TCP sockets in LISTEN state owned by ``pids`` (from /proc)."""
    import ipaddress

    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr = parts[1].split(":")[0]
            raw = bytes.fromhex(hexaddr)
            # /proc stores each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(str(ipaddress.ip_address(raw)))
    return found


def test_local_ray_listens_on_loopback_only(tmp_path):
    import ipaddress

    proc = subprocess.Popen(maskgen_cmd("build", "--method", "drfi", "--sample-size", "150", "--out", str(tmp_path / "o"),
                                        "--no-progress"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    seen: set[str] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            seen.update(_listening_addresses(_session_pids(proc.pid)))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen, "no listening socket observed: the check saw nothing"
    for addr in seen:
        ip = ipaddress.ip_address(addr)
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        assert ip.is_loopback, f"a Ray process listens on {addr}"
