"""Process-group helpers for the DDP port of the loss (spec sections 3.6 and 11.4).

The official code replicates the NCE targets to every GPU, so each source sees the whole global
batch as negatives. Under DDP the same is obtained by all-gathering the target maps with
:func:`all_gather_with_grad` while keeping the sources local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather + cat forward; all-reduce (SUM) of the gradient and this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, size = world()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss depends on this rank's rows, but only the other ranks hold those
        # gradients: summing over ranks collects them all, then each rank keeps its own rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Differentiable all-gather along dim 0: (B, ...) on each rank -> (world_size * B, ...).

    Every rank must pass the same shape, and every rank must run the backward pass (as DDP does),
    since the backward is itself a collective. Rank r's rows sit at ``[r * B, (r + 1) * B)``.

    Gradient semantics: with each rank backpropagating its own mean loss ``L_r``, rank r receives
    ``sum_r' dL_r' / dx_r``, which is ``world_size`` times the gradient of the global mean loss
    ``mean_r L_r``. DDP's gradient averaging over ranks divides that factor out again, so the
    parameter update equals the single-process update on the concatenated batch.

    The identity when torch.distributed is not initialised or the world size is 1.
    """
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


__all__ = ["all_gather_with_grad", "world"]
