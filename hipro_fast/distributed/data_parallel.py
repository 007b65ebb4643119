"""Data parallelism for fit() and evaluate(): each rank takes its slice of the
one-process global batch and of the evaluation features, and the gradients of
the (replicated) learned tensors are summed over the ranks.

Because `batch_indices` is a function of (seed, epoch, task) only, every rank
draws the same global batch; rank r keeps the r-th of `world_size` near-equal
contiguous pieces of it (torch.tensor_split). The per-task loss on a rank is
its pieces' cross-entropy SUM divided by the GLOBAL batch size, so the sum of
the ranks' losses is the one-process mean loss and the summed gradient is the
one-process gradient (up to floating-point summation order).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .group import current

__all__ = ["local_part", "local_range", "all_reduce_grads"]


def local_part(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous piece of a global batch (may be empty when the
    batch has fewer entries than ranks)."""
    return torch.tensor_split(batch, world_size)[rank]


def local_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (sizes differ by at most 1)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in one flat all-reduce.

    A parameter without a gradient on a rank contributes zeros; one without a
    gradient on every rank keeps `grad is None` (as in one process, where SGD
    then skips it)."""
    if current() is None or not params:
        return
    # One flat buffer in the widest dtype of the parameters (fp32 contexts: fp32;
    # an fp64 parameter keeps fp64 precision).
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=params[0].device,
                                     dtype=dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    has = flat[-len(params):]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if has[i] > 0:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n
