"""Per-epoch quality signals of a representation, cheap enough to compute every epoch.

Both score the global features ``r1`` (``n_rkhs`` wide) of un-augmented images and need no
training of a classifier, so they do not lag the encoder the way the online linear probe does.

* **Weighted kNN accuracy** (the instance-discrimination lineage; lightly's ``knn_predict`` and
  solo-learn's ``WeightedKNNClassifier`` are the usual monitors): L2-normalise a labelled bank and
  the queries, take each query's ``k`` most cosine-similar bank entries, let each vote for its
  label with weight ``exp(similarity / T)``, predict the label with the largest summed weight.
* **RankMe** (Garrido et al., ICML 2023): the effective rank of an embedding matrix, the
  exponential of the entropy of its normalised singular values. It needs no labels; the paper
  recommends it for comparing runs of one method, which is what a study does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    n_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN labels of ``query`` against a labelled ``bank`` (cosine similarity).

    Args:
        query: (M, D) features. bank: (N, D) features. bank_labels: (N,) int64 in [0, n_classes).
        k: neighbours per query (capped at N). temperature: T in the vote weight exp(s / T).
        chunk: queries scored at once, which bounds the (chunk, N) similarity block in memory.

    Returns:
        (M,) int64 predicted labels; ties go to the lower class index.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(q.shape[0], n_classes, dtype=torch.float64, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim.double() / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    n_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on labelled queries (NaN with no queries)."""
    if query.shape[0] == 0:
        return math.nan
    pred = knn_predict(query, bank, bank_labels, n_classes, k=k, temperature=temperature)
    return float((pred == query_labels).float().mean())


@torch.no_grad()
def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe of an embedding matrix ``z`` (N samples x D dims): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = sigma_k / sum_j sigma_j + eps`` over the singular values ``sigma`` (Garrido et al. 2023,
    eq. 1). Between 1 (all samples on one line) and min(N, D); invariant to scaling ``z``."""
    s = torch.linalg.svdvals(z.double())
    if s.sum() <= 0:
        return 1.0 if z.numel() else math.nan
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
