"""Online linear and MLP probes on the detached global feature (spec section 6.1).

The probes are trained jointly with the encoder by the same optimiser, but on ``r1.detach()``, so
no gradient reaches the encoder: they only monitor representation quality while training runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_CLIP = 10.0  # spec 6.1: CE on 10*tanh(logits/10)
LOGIT_REG = 1e-3  # spec 6.1: + 1e-3 * mean(logits^2)


class OnlineProbes(nn.Module):
    """The official evaluator heads (spec 6.1).

    Args:
        n_features: input width (``n_rkhs``).
        n_classes: number of labels.
        mlp_hidden: MLP hidden width (1024 in the official code).
        dropout: MLP dropout (0.2).
    """

    def __init__(self, n_features: int, n_classes: int, mlp_hidden: int = 1024, dropout: float = 0.2):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(n_features, mlp_hidden, bias=False),
            nn.BatchNorm1d(mlp_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, n_classes),
        )
        self.linear = nn.Linear(n_features, n_classes)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of both heads.

        Args:
            features: (N, n_features) detached global features.

        Returns:
            (linear logits, MLP logits), each (N, n_classes), float32.
        """
        features = features.float()
        return self.linear(features), self.mlp(features)


def classifier_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Soft-clipped cross-entropy plus a logit penalty; label -1 (unlabelled) is ignored.

    Args:
        logits: (N, C). labels: (N,) int64 with -1 for unlabelled samples.
    """
    clipped = LOGIT_CLIP * torch.tanh(logits / LOGIT_CLIP)
    # The mean over labelled samples, written without a data-dependent branch: no host sync on
    # the GPU and no graph break under torch.compile. An all-unlabelled batch (STL-10's unlabeled
    # split, the online validation images) contributes only the penalty.
    mask = labels >= 0
    per_sample = F.cross_entropy(clipped, labels.clamp_min(0), reduction="none")
    ce = (per_sample * mask).sum() / mask.sum().clamp_min(1)
    return ce + LOGIT_REG * (logits**2).mean()


def correct_and_count(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(number correct, number labelled) as detached float tensors, skipping label -1.

    Tensors rather than Python numbers, so a training step never waits on the device for them.
    """
    mask = labels >= 0
    correct = (logits.detach().argmax(dim=1) == labels) & mask
    return correct.sum().float(), mask.sum().float()
