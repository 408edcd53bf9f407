"""Run by torchrun from test_sslmask_train.py: one DDP step of HARL on this rank's half of a
fixed global batch; rank 0 saves the averaged loss and the synchronised gradients."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from ddp_reference import global_batch, make_method

from sslmask.progress import Progress


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    method = make_method()
    model = torch.nn.parallel.DistributedDataParallel(method)
    batch = global_batch()
    half = len(batch["view0"]) // world
    local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
    loss = model(local, Progress(3, 10, 10))["loss"]
    loss.backward()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"loss": reduced / world, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
