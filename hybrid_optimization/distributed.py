"""torchrun / DistributedDataParallel helpers.

`torchrun --nproc_per_node N distillation.py ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `init_distributed` joins them into one process group (NCCL on CUDA, gloo on CPU).
Without those variables everything here is a no-op for a single process, so the same training code runs both ways.

Every rank must take identical hybrid decisions (LR multiplier, trust radius, stop): gradients are averaged by DDP,
and scalars that feed decisions are averaged or OR-ed with the helpers below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str = "cpu", timeout_s: float = 1800) -> DistContext:
    """Join the torchrun process group (once); a single process gets a context of world size 1."""
    if not launched_by_torchrun():
        return DistContext()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return DistContext(rank=rank, world_size=1, local_rank=local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def _tensor(value: float, ctx: DistContext, device: torch.device | str) -> torch.Tensor:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    return torch.tensor([float(value)], dtype=torch.float64, device=device if ctx.backend == "nccl" else "cpu")


def all_reduce_mean(value: float, ctx: DistContext, device: torch.device | str = "cpu") -> float:
    if not ctx.enabled:
        return float(value)
    t = _tensor(value, ctx, device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def all_reduce_max(value: float, ctx: DistContext, device: torch.device | str = "cpu") -> float:
    if not ctx.enabled:
        return float(value)
    t = _tensor(value, ctx, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool, ctx: DistContext, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is True on at least one (e.g. a stop request seen by rank 0 or a SIGTERM)."""
    return all_reduce_max(1.0 if flag else 0.0, ctx, device) > 0


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Rank `src`'s object on every rank (pickled; for small things: a run id, cluster labels, a bit map)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard(indices, ctx: DistContext):
    """This rank's equal, contiguous share of a global batch of indices (the batch size must divide evenly)."""
    if not ctx.enabled:
        return indices
    per_rank = len(indices) // ctx.world_size
    return indices[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
