"""Mixture-based representations and the segmentation they induce (spec section 4).

The paper generates k mixture components ``{f1^1 .. f1^k}`` of the global feature ``f1`` with a
fully connected network with residual connections. Each location of the other view's local map
is softly assigned to the components by ``q(j|l) = softmax_j(s_nce(f1^j, f7^l) / alpha)``; the
argmax assignment is the emergent segmentation. No public code exists for this part; the
formulation follows the spec's [RECALL] notes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amdim.config import LossConfig
from amdim.nce import nce_log_probs

# Distinct colours for the assignment maps (RGB in [0, 1]); components beyond these reuse them.
_PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.45, 0.90],
        [0.15, 0.75, 0.20],
        [0.95, 0.75, 0.10],
        [0.60, 0.20, 0.80],
        [0.10, 0.80, 0.80],
        [0.95, 0.45, 0.10],
        [0.90, 0.40, 0.70],
        [0.50, 0.50, 0.50],
        [0.55, 0.35, 0.15],
    ]
)


class MixtureHead(nn.Module):
    """``f1^j = f1 + W2_j relu(W1 f1 + b1) + b2_j`` for j = 1..k (spec section 4).

    One shared hidden layer, one output layer per component, and a residual connection from the
    input to every component.

    Initialisation: both layers keep PyTorch's default (Kaiming-uniform weights, uniform biases).
    The output layer is deliberately not zero-initialised: zeros would make every component equal
    to ``f1``, and since all components then get the same gradients they would never separate.
    With the default init the residual branch is a small perturbation (roughly a quarter of the
    input's scale for unit-variance features), so training starts close to the plain model.

    Args:
        dim: feature dimension D (``n_rkhs``).
        n_mix: number of components k.
        hidden: hidden width; 0 means D.
    """

    def __init__(self, dim: int, n_mix: int, hidden: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"MixtureHead: dim must be >= 1, got {dim}")
        if n_mix < 1:
            raise ValueError(f"MixtureHead: n_mix must be >= 1, got {n_mix}")
        if hidden < 0:
            raise ValueError(f"MixtureHead: hidden must be >= 0 (0 means dim), got {hidden}")
        self.dim, self.n_mix = dim, n_mix
        width = hidden or dim
        self.hidden = nn.Linear(dim, width)
        self.out = nn.Linear(width, n_mix * dim)

    @classmethod
    def from_config(cls, cfg: LossConfig, n_rkhs: int) -> MixtureHead:
        """The head for ``cfg.n_mix`` components with ``cfg.mix_hidden`` hidden units."""
        return cls(n_rkhs, cfg.n_mix, cfg.mix_hidden)

    def forward(self, f1: Tensor) -> Tensor:
        """(B, D) or (B, D, 1, 1) global features -> (B, k, D) components."""
        f1 = f1.flatten(1)
        delta = self.out(F.relu(self.hidden(f1)))
        return f1.unsqueeze(1) + delta.view(-1, self.n_mix, self.dim)


@torch.no_grad()
def mixture_posteriors(
    r1: Tensor, r_local: Tensor, head: MixtureHead, alpha: float, *, tclip: float | None = None
) -> Tensor:
    """``q(j | location)`` of each image's own components over its own local map (spec section 4).

    The per-location scores are the training NCE log-probabilities: image b's components are the
    antecedents, its own map holds the positives, and the other images' maps the negatives.

    Args:
        r1: global features, shape (B, D, 1, 1) or (B, D); B >= 2 (the others are negatives).
        r_local: local map, shape (B, D, H, W), e.g. r7.
        head: the mixture head.
        alpha: entropy weight (temperature 1 / alpha) of the softmax over components.
        tclip: the soft clip used in training (``cfg.tclip``).

    Returns:
        Float32 tensor of shape (B, k, H, W) summing to 1 over k.
    """
    if r_local.dim() != 4:
        raise ValueError(f"mixture_posteriors: r_local must be (B, D, H, W), got {tuple(r_local.shape)}")
    if r_local.shape[0] < 2:
        raise ValueError("mixture_posteriors: needs at least 2 images (the others are the negatives)")
    bsz, _, h, w = r_local.shape
    log_probs, _ = nce_log_probs(head(r1), r_local.flatten(2), 0, tclip)
    return torch.softmax(log_probs / alpha, dim=1).view(bsz, -1, h, w)


def segment(
    r1: Tensor, r_local: Tensor, head: MixtureHead, alpha: float, *, tclip: float | None = None
) -> Tensor:
    """Per-location component assignment ``argmax_j q(j | location)``: LongTensor (B, H, W).

    Since alpha > 0 only rescales the scores, the argmax does not depend on it; it is taken for
    symmetry with :func:`mixture_posteriors`. See there for the arguments.
    """
    return mixture_posteriors(r1, r_local, head, alpha, tclip=tclip).argmax(dim=1)


def _palette(k: int) -> Tensor:
    return _PALETTE[torch.arange(k) % len(_PALETTE)]


def colour_assignments(assignments: Tensor, k: int, size: tuple[int, int]) -> Tensor:
    """(B, h, w) component indices -> (B, 3, H, W) colour images, nearest-upsampled to ``size``."""
    if assignments.numel() and (int(assignments.min()) < 0 or int(assignments.max()) >= k):
        raise ValueError(
            f"colour_assignments: assignments must lie in [0, {k}), got {int(assignments.max())}"
        )
    rgb = _palette(k)[assignments.long().cpu()].permute(0, 3, 1, 2)  # (B, 3, h, w)
    return F.interpolate(rgb, size=size, mode="nearest")


def save_segmentation_grid(
    images: Tensor, assignments: Tensor, path: str | Path, k: int, *, ncols: int = 4
) -> Path:
    """Write a PNG grid of each image beside its colour-coded assignment map.

    Args:
        images: (B, 3, H, W), float in [0, 1] or uint8.
        assignments: (B, h, w) component indices in [0, k) (e.g. from :func:`segment`).
        path: output PNG path; parent folders are created.
        k: number of components (fixes the colours).
        ncols: image/map pairs per row.

    Returns:
        The path written.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"save_segmentation_grid: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if assignments.dim() != 3 or assignments.shape[0] != images.shape[0]:
        raise ValueError(
            f"save_segmentation_grid: assignments must be (B, h, w) with B={images.shape[0]}, "
            f"got {tuple(assignments.shape)}"
        )
    from torchvision.utils import make_grid, save_image  # imported on use: it costs ~1.5 s

    imgs = images.detach().cpu()
    imgs = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float().clamp(0, 1)
    maps = colour_assignments(assignments, k, (imgs.shape[2], imgs.shape[3]))
    pairs = torch.stack([imgs, maps], dim=1).flatten(0, 1)  # image, map, image, map, ...
    grid = make_grid(pairs, nrow=2 * max(1, min(ncols, images.shape[0])), padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


__all__ = ["MixtureHead", "colour_assignments", "mixture_posteriors", "save_segmentation_grid", "segment"]
