"""Every collective rayssl makes, in one place.

The rule: **all ranks call each function together**, at the same point of the same step, and
never from a branch that only some ranks take (``if rank == 0: ...``). A collective that one
rank skips hangs the others until the backend times out. Code that needs a global value on
rank 0 only computes it on every rank first, then branches.

In a single process (no process group, or a group of one) every function is the identity, so
the training step, the objective and ``TrainRun`` run and test without Ray or torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over all ranks (a copy)."""
    x = x.clone()
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_max(x: Tensor) -> Tensor:
    """Element-wise max of ``x`` over all ranks (a copy)."""
    x = x.clone()
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def largest(value: int, device: torch.device | str = "cpu") -> int:
    """The largest of a small integer over all ranks: one one-element all-reduce on ``device``
    (the backend's device: CUDA for NCCL). TrainRun's stop code, so every rank stops at one step
    for one reason."""
    return int(all_max(torch.tensor([float(value)], device=device)).item())


def sum_int(value: int) -> int:
    """An integer count summed over all ranks (float64 carries counts exactly below 2**53)."""
    return int(all_sum(torch.tensor(float(value), dtype=torch.float64)))


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects: RNG states, data positions,
    k-NN query features and neighbour lists)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
