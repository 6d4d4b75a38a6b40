"""Process-group helpers for the DDP port of the loss (spec sections 3.6 and 11.4).

The official code replicates the NCE targets to every GPU, so each source sees the whole global
batch as negatives. Under DDP the same is obtained by all-gathering the target maps with
:func:`all_gather_with_grad` while keeping the sources local.

The gather is one single-tensor all-gather forward and one reduce-scatter backward: collectives
that ``torch.compile`` traces (no graph break around the loss), with half the traffic of an
all-reduce of the whole gathered gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.14 names the single-tensor collectives all_gather_single / reduce_scatter_single and
# deprecates all_gather_into_tensor / reduce_scatter_tensor, which are all that torch 2.11 (the
# GPU machines' image) has. Same signatures; dynamo traces both spellings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 forward; reduce-scatter (SUM) of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        size = dist.get_world_size()
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss depends on this rank's rows, but only the other ranks hold those
        # gradients: the reduce-scatter sums each rank's slice over all ranks and hands it to
        # that rank.
        size = dist.get_world_size()
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


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


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP for this rank of the default process group (the identity alone).

    Parameters the configured loss never reaches are frozen by the model itself
    (:meth:`amdim.model.AMDIM.unused_by_loss`), so DDP can keep ``find_unused_parameters=False``
    and skip walking the autograd graph after every backward pass.
    """
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = ["all_gather_with_grad", "world", "wrap_ddp"]
