"""Multiscale NCE across views (spec section 3) and its mixture extension (spec section 4).

Everything here is a pure function of tensors. Shapes use B (local batch), N (images whose maps
are the targets: the global batch once gathered, N >= B), D (``n_rkhs``), K (antecedents per
image: 1, or ``n_mix`` mixture components) and L (target locations: 25 for 5x5, 49 for 7x7).

The score maths runs in float32, even under ``torch.autocast``: the matmul is done with autocast
disabled on float32 copies, and the regulariser, tanh clip and log-sum-exp follow in float32
(spec section 11.2). ``precision="bf16"`` (``train.matmul_precision=bf16``) gives the matmul bf16
copies instead, with fp32 accumulation; its scores are rounded to bf16 and then everything after
the matmul is float32 again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amdim.config import LossConfig

Gather = Callable[[Tensor], Tensor]
Features = Sequence[Tensor] | Mapping[str, Tensor]

N_LOC5 = 25
"""Locations of the 5x5 map; the 5t5 pair draws one of them per image as its antecedent."""


PRECISIONS = ("fp32", "bf16")


def scores(src: Tensor, trg: Tensor, precision: str = "fp32") -> Tensor:
    """Raw scores ``s[b, k, n, l] = <src[b, k], trg[n, :, l]> / sqrt(D)`` in float32 (spec 3.3.1).

    Args:
        src: antecedents, shape (B, K, D).
        trg: consequents, shape (N, D, L).
        precision: the matmul's inputs: ``fp32`` (TF32 where the backend allows it), or ``bf16``
            (bf16 copies, fp32 accumulation: tensor cores on a GPU, AMX / AVX512-BF16 on a CPU).

    Returns:
        Float32 tensor of shape (B, K, N, L). No temperature, no normalisation (spec 11.6).
    """
    if src.dim() != 3 or trg.dim() != 3 or src.shape[2] != trg.shape[1]:
        raise ValueError(
            f"scores: need src (B, K, D) and trg (N, D, L), got {tuple(src.shape)} and {tuple(trg.shape)}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"scores: precision must be one of {PRECISIONS}, got '{precision}'")
    b, k, d = src.shape
    n, _, n_loc = trg.shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # Autocast would run this matmul in bf16/fp16; the official code only casts after the matmul,
    # doing the product in fp32 too is the "harmless improvement" of spec 11.2.
    with torch.autocast(device_type=src.device.type, enabled=False):
        flat_trg = trg.to(dtype).permute(1, 0, 2).reshape(d, n * n_loc)
        s = torch.matmul(src.to(dtype).reshape(b * k, d), flat_trg).float()
    return s.view(b, k, n, n_loc) / math.sqrt(d)


def soft_clip(s: Tensor, tclip: float | None) -> Tensor:
    """``tclip * tanh(s / tclip)`` (spec 3.3.3); the identity when ``tclip`` is None."""
    return s if tclip is None else tclip * torch.tanh(s / tclip)


def nce_log_probs(
    src: Tensor, trg: Tensor, pos_offset: int = 0, tclip: float | None = None, precision: str = "fp32"
) -> tuple[Tensor, Tensor]:
    """Per-location NCE log-probabilities of the positives, and the score regulariser (spec 3.3).

    Source ``b``'s positive image is ``trg[pos_offset + b]``. For each (b, k, l) the softmax runs over
    the positive ``s'[b, k, pos, l]`` and the negatives ``s'[b, k, n, l']`` for every ``n != pos``
    and every ``l'``; other locations of the positive image are not in the denominator (spec
    3.3.4). Computed as ``-softplus(LSE_neg - pos)``, with the positive image masked to -inf.

    Args:
        src: antecedents, shape (B, K, D).
        trg: consequents of the (possibly gathered) batch, shape (N, D, L), N >= pos_offset + B.
        pos_offset: index in ``trg`` of source 0's positive (the rank offset under DDP).
        tclip: soft-clip constant c, or None for no clip.
        precision: the score matmul's inputs (see :func:`scores`).

    Returns:
        ``(log_probs, reg)``: float32 log-probabilities of shape (B, K, L), and the unweighted
        regulariser ``mean(s**2)`` over all raw, pre-clip scores (a scalar; spec 3.3.2).
    """
    _check_positives(src.shape[0], trg.shape[0], pos_offset)
    return nce_from_scores(scores(src, trg, precision), pos_offset, tclip)


def _check_positives(b: int, n: int, pos_offset: int) -> None:
    if pos_offset < 0 or pos_offset + b > n:
        raise ValueError(
            f"nce_log_probs: positives {pos_offset}..{pos_offset + b - 1} outside the {n} targets"
        )


def nce_from_scores(s: Tensor, pos_offset: int = 0, tclip: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`nce_log_probs` from raw scores ``s`` of shape (B, K, N, L) (see :func:`scores`).

    Each antecedent k has its own denominator, so the scores of several antecedents against the
    same targets can come from one matmul and be split along K (``multiscale_nce`` does so for the
    pairs that share a target map)."""
    b, _, n, _ = s.shape
    _check_positives(b, n, pos_offset)
    reg = s.pow(2).mean()
    s = soft_clip(s, tclip)
    pos_idx = torch.arange(b, device=s.device) + pos_offset
    pos = s[torch.arange(b, device=s.device), :, pos_idx]  # (B, K, L)
    # Made by comparison, not by indexed assignment: on a GPU the assigned True would be a tensor
    # copied from the host, a sync in every step (tests/test_host_syncs.py).
    is_pos = (torch.arange(n, device=s.device) == pos_idx[:, None]).view(b, 1, n, 1)
    neg = s.masked_fill(is_pos, float("-inf"))
    lse_neg = torch.logsumexp(neg.flatten(2), dim=2)  # (B, K): one denominator per source
    return -F.softplus(lse_neg.unsqueeze(-1) - pos), reg


def sample_locations(
    n: int,
    b: int,
    offset: int = 0,
    *,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One uniformly random 5x5 location per image (spec 3.1; gather form of spec 11.1).

    Draws ``randint(0, 25, (n,))`` for the ``n`` images of the global batch and keeps this rank's
    slice ``[offset, offset + b)``. With a generator seeded alike on every rank, a DDP run therefore
    picks exactly the locations a single process would pick for the concatenated batch.

    Returns:
        LongTensor of shape (b,) with flat indices ``row * 5 + col``, on ``device``.
    """
    draw_device = generator.device if generator is not None else device
    idx = torch.randint(0, N_LOC5, (n,), generator=generator, device=draw_device)
    return idx[offset : offset + b].to(device)


def gather_locations(r5: Tensor, idx: Tensor) -> Tensor:
    """``r5[b, :, idx[b] // 5, idx[b] % 5]`` for each b: (B, D, 5, 5), (B,) -> (B, D)."""
    flat = r5.flatten(2)  # (B, D, 25)
    return flat.gather(2, idx.view(-1, 1, 1).expand(-1, flat.shape[1], 1)).squeeze(2)


def mix_alpha(cfg: LossConfig) -> float:
    """The entropy weight alpha: ``cfg.mix_alpha``, or ``1 / cfg.mix_tau`` (spec section 4)."""
    return cfg.mix_alpha if cfg.mix_alpha is not None else 1.0 / cfg.mix_tau


def mixture_objective(log_probs: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per-location mixture objective ``sum_j q(j|l) nce[j, l] + alpha * H(q(.|l))`` (spec 4).

    ``q(.|l) = softmax_j(nce[j, l] / alpha)`` is the closed-form maximiser over q, computed from
    detached scores. By the envelope argument the gradient through q vanishes at the maximiser, so
    the gradient is ``sum_j q_j * d nce_j``, exactly that of ``alpha * logsumexp_j(nce_j / alpha)``
    (the value is the same too). The q-weighted form is kept because with k = 1 it gives
    ``q = 1, H = 0`` and returns ``nce`` bit for bit.

    Args:
        log_probs: per-location NCE log-probabilities, shape (B, k, L).
        alpha: entropy weight (> 0); alpha = 1 / tau.

    Returns:
        ``(objective, entropy)``, both of shape (B, L); the entropy is detached.
    """
    log_q = torch.log_softmax(log_probs.detach() / alpha, dim=1)
    q = log_q.exp()
    entropy = -(q * log_q).sum(dim=1)
    return (q * log_probs).sum(dim=1) + alpha * entropy, entropy


def _unpack(features: Features) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(features, Mapping):
        return features["r1"], features["r5"], features["r7"]
    r1, r5, r7 = features
    return r1, r5, r7


def _check_mix(name: str, mix: Tensor | None, cfg: LossConfig, b: int, d: int) -> None:
    if mix is None:
        if cfg.n_mix > 1 and cfg.mix_pairs:
            raise ValueError(f"multiscale_nce: loss.n_mix={cfg.n_mix} needs {name} (B, n_mix, D)")
        return
    if tuple(mix.shape) != (b, cfg.n_mix, d):
        raise ValueError(
            f"multiscale_nce: {name} must have shape {(b, cfg.n_mix, d)}, got {tuple(mix.shape)}"
        )


def multiscale_nce(
    a: Features,
    b: Features,
    cfg: LossConfig,
    *,
    gather: Gather | None = None,
    rank_offset: int = 0,
    mix_a: Tensor | None = None,
    mix_b: Tensor | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """The self-supervised loss of spec 3.4 for two views, with optional mixtures (spec 4).

    For each pair in ``cfg.pairs`` both directions are computed (antecedent from view a, targets
    from view b, and the reverse) and combined as ``0.5 * (d1 + d2)``; a direction's loss is
    ``-mean_{b,l} nce``. ``loss = sum of pair terms + reg_weight * sum_pairs 0.5 * (reg1 + reg2)``.

    Targets go through ``gather`` (e.g. :func:`amdim.distributed.all_gather_with_grad`) so that the
    negatives are the global batch (spec 3.6); sources stay local and positives sit at
    ``rank_offset + b``. Every rank must call this with the same config, so the gathers line up.

    The 5t5 antecedents come from :func:`sample_locations`: first the a->b direction's draw, then
    the b->a direction's, each over the gathered batch size, from ``generator`` if given.

    Mixtures: when ``mix_a`` / ``mix_b`` are given (required when ``cfg.n_mix > 1``), the global
    antecedent of the pairs in ``cfg.mix_pairs`` is replaced by the k components and the direction
    objective becomes ``-mean_{b,l} mixture_objective`` with ``alpha = mix_alpha(cfg)``. With k = 1
    this is exactly the plain loss.

    Args:
        a, b: each view's encoder outputs ``(r1, r5, r7)`` (or a mapping with those keys), shapes
            (B, D, 1, 1), (B, D, 5, 5), (B, D, 7, 7).
        cfg: the loss configuration (pairs, reg_weight, tclip, n_mix, mix_alpha/mix_tau, mix_pairs).
        gather: maps a local (B, D, L) target tensor to the global (N, D, L) one; None = identity.
        rank_offset: index of this rank's first image in the gathered batch.
        mix_a, mix_b: mixture components of each view's global feature, shape (B, n_mix, D).
        generator: RNG for the 5x5 source locations.
        precision: the score matmul's inputs, ``fp32`` or ``bf16`` (see :func:`scores`).

    Returns:
        ``{"loss", "g2l_<pair>" for each configured pair, "reg"}`` (all with gradient; "reg" is the
        weighted regulariser), plus ``"mix_entropy"`` (detached mean of H(q) over the mixture
        pairs, both directions, all locations) when mixtures are used.
    """
    gather = gather if gather is not None else (lambda x: x)
    views = (_unpack(a), _unpack(b))
    r1 = views[0][0]
    bsz, d = r1.shape[0], r1.shape[1]
    use_mix = mix_a is not None or mix_b is not None or cfg.n_mix > 1
    if use_mix:
        _check_mix("mix_a", mix_a, cfg, bsz, d)
        _check_mix("mix_b", mix_b, cfg, bsz, d)
    mixes = (mix_a, mix_b)
    alpha = mix_alpha(cfg)

    gathered: dict[tuple[int, int], Tensor] = {}

    def targets(view: int, size: int) -> Tensor:
        # Gather each target map once, shared by the pairs that use it (1t5 and 5t5 share r5).
        if (view, size) not in gathered:
            gathered[(view, size)] = gather(views[view][1 if size == 5 else 2].flatten(2))
        return gathered[(view, size)]

    # Every (pair, direction)'s antecedents, pair by pair, a->b before b->a (the 5t5 draws' order).
    jobs: list[tuple[str, bool, tuple[int, int], Tensor]] = []
    for pair in cfg.pairs:
        src_size, trg_size = int(pair[0]), int(pair[2])
        mixed = use_mix and src_size == 1 and pair in cfg.mix_pairs
        for s_view, t_view in ((0, 1), (1, 0)):
            trg = targets(t_view, trg_size)
            if mixed:
                src = mixes[s_view]
            elif src_size == 1:
                src = views[s_view][0].flatten(1).unsqueeze(1)
            else:
                idx = sample_locations(trg.shape[0], bsz, rank_offset, device=r1.device, generator=generator)
                src = gather_locations(views[s_view][1], idx).unsqueeze(1)
            jobs.append((pair, mixed, (t_view, trg_size), src))

    # One score matmul per target map: the antecedents of every pair scoring against it (1t5 and
    # 5t5 share the other view's 5x5 map) stacked along K, the scores split back per pair.
    nce: dict[int, tuple[Tensor, Tensor]] = {}
    for key in dict.fromkeys(job[2] for job in jobs):
        group = [j for j, job in enumerate(jobs) if job[2] == key]
        srcs = [jobs[j][3] for j in group]
        src = srcs[0] if len(srcs) == 1 else torch.cat([x.float() for x in srcs], dim=1)
        all_scores = scores(src, gathered[key], precision)
        for j, s in zip(group, all_scores.split([x.shape[1] for x in srcs], dim=1)):
            nce[j] = nce_from_scores(s, rank_offset, cfg.tclip)

    out: dict[str, Tensor] = {}
    reg_total = r1.new_zeros((), dtype=torch.float32)
    entropies: list[Tensor] = []
    for first in range(0, len(jobs), 2):
        pair, mixed = jobs[first][0], jobs[first][1]
        losses, regs = [], []
        for j in (first, first + 1):
            log_probs, reg = nce[j]
            if mixed:
                objective, entropy = mixture_objective(log_probs, alpha)
                entropies.append(entropy.mean())
                losses.append(-objective.mean())
            else:
                losses.append(-log_probs.mean())
            regs.append(reg)
        out[f"g2l_{pair}"] = 0.5 * (losses[0] + losses[1])
        reg_total = reg_total + 0.5 * (regs[0] + regs[1])
    out["reg"] = cfg.reg_weight * reg_total
    loss = out[f"g2l_{cfg.pairs[0]}"]
    for pair in cfg.pairs[1:]:
        loss = loss + out[f"g2l_{pair}"]
    out["loss"] = loss + out["reg"]
    if entropies:
        out["mix_entropy"] = torch.stack(entropies).mean().detach()
    return out


__all__ = [
    "gather_locations",
    "mix_alpha",
    "mixture_objective",
    "multiscale_nce",
    "nce_from_scores",
    "nce_log_probs",
    "sample_locations",
    "scores",
    "soft_clip",
]
