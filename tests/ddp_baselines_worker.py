"""Run by torchrun from test_sslmask_baselines.py: one DDP step of MoCo v2 or MoCo v3 on this
rank's half of a fixed global batch; rank 0 saves the mean loss, the synchronised gradients
and (MoCo v2) the queue after the step's enqueue."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from ddp_reference import global_batch

from sslmask.config import load_settings
from sslmask.methods import build_method
from sslmask.progress import Progress

SETS = ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16", "mocov2.queue=20"]


def make(name: str):
    cfg = load_settings(name, "cpu-demo", [s for s in SETS if s.split(".")[0] in ("model", name)])
    torch.manual_seed(0)
    return build_method(cfg)


def main(name: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    method = make(name)
    model = torch.nn.parallel.DistributedDataParallel(method)
    batch = {k: v for k, v in global_batch().items() if k.startswith("view")}
    half = len(batch["view0"]) // world
    local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
    loss = model(local, Progress(3, 10, 10, method.settings.train.seed, rank))["loss"]
    loss.backward()
    method.after_optimizer_step(Progress(3, 10, 10, method.settings.train.seed, rank))
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    if rank == 0:
        queue = method.queue.clone() if hasattr(method, "queue") else None
        torch.save({"loss": reduced / world, "grads": grads, "queue": queue}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
