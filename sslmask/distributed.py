"""torchrun integration: one process per device, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over processes (one collective for all of them)."""
    if info.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def world_size() -> int:
    """Processes in the group (1 when not distributed): what methods ask, without a DistInfo."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def all_gather(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every process concatenated along dim 0, in rank order (no gradient; the same
    shape on every rank). Alone, ``t`` itself: methods call it without knowing the world."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_gather_uneven(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """As :func:`all_gather` for tensors whose first dimension differs between ranks."""
    if info.world_size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = all_gather(n).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = all_gather(padded).split(max(sizes))
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])


@torch.no_grad()
def broadcast(t: torch.Tensor, info: DistInfo, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (the others pass a tensor of the same shape and dtype)."""
    if info.world_size > 1:
        t = t.to(info.device).contiguous()
        dist.broadcast(t, src)
    return t


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only when ``flag`` holds on every process (so all ranks take the same branch)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=info.device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
