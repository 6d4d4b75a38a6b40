"""Offline linear-probe evaluation of a frozen encoder.

Protocol ``linear-frozen-r1-v1``:

1. The encoder is put in eval mode (running BN statistics) and frozen; the global feature ``r1``
   (``n_rkhs`` wide) of every image, under the test transform (no augmentation), is extracted once.
2. Features are standardised with the mean and std of the training features.
3. A validation split (``probe.val_fraction``, stratified, seeded) is carved from the *training*
   set; the test set is never used to choose anything.
4. For every (learning rate, weight decay) in the grid a linear classifier is trained with Adam for
   ``probe.epochs`` epochs on the remaining training features and scored on the validation split.
5. The best pair is retrained on the whole training set and scored once on the test set.

The result carries the protocol name, so numbers from different protocols are never mixed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amdim.config import ProbeConfig

PROTOCOL = "linear-frozen-r1-v1"


@torch.no_grad()
def extract_features(
    encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Global features of a frozen encoder in eval mode.

    Args:
        encoder: returns (r1, r5, r7) for a (B, 3, S, S) batch.
        batches: (images (B, 3, S, S) normalised float, labels (B,)) pairs.

    Returns:
        features (N, n_rkhs) float32 on the CPU, labels (N,) int64.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            r1 = encoder(x.to(device, non_blocking=True))[0]
            feats.append(r1.flatten(1).float().cpu())
            labels.append(y.cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, val) with ``fraction`` of every class in val (at least one when possible)."""
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(fraction * len(idx))
        if len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _fit_linear(
    x: Tensor, y: Tensor, n_classes: int, lr: float, wd: float, cfg: ProbeConfig, seed: int
) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(clf(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return clf


@torch.no_grad()
def _accuracy(clf: nn.Linear, x: Tensor, y: Tensor) -> float:
    return float((clf(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: ProbeConfig
) -> dict[str, Any]:
    """Run the protocol above on extracted features.

    Args:
        train_x: (N, D) training features; train_y: (N,) labels (-1 rows are dropped).
        test_x: (M, D) test features; test_y: (M,) labels.

    Returns:
        A dict with ``test_accuracy``, ``val_accuracy``, ``train_accuracy``, the chosen
        ``lr``/``weight_decay``, the grid's validation scores, split sizes and ``protocol``.
    """
    keep = train_y >= 0
    train_x, train_y = train_x[keep].float(), train_y[keep]
    keep = test_y >= 0
    test_x, test_y = test_x[keep].float(), test_y[keep]
    n_classes = int(max(train_y.max(), test_y.max())) + 1

    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    tr, va = stratified_split(train_y, cfg.val_fraction, cfg.seed)
    grid: dict[str, float] = {}
    best: tuple[float, float, float] | None = None
    for lr in cfg.lrs:
        for wd in cfg.weight_decays:
            clf = _fit_linear(train_x[tr], train_y[tr], n_classes, lr, wd, cfg, cfg.seed)
            acc = _accuracy(clf, train_x[va], train_y[va])
            grid[f"lr={lr:g},wd={wd:g}"] = acc
            if best is None or acc > best[0]:  # ties keep the earlier (smaller lr, smaller wd) pair
                best = (acc, lr, wd)
    assert best is not None
    val_acc, lr, wd = best
    clf = _fit_linear(train_x, train_y, n_classes, lr, wd, cfg, cfg.seed)
    return {
        "protocol": PROTOCOL,
        "test_accuracy": _accuracy(clf, test_x, test_y),
        "val_accuracy": val_acc,
        "train_accuracy": _accuracy(clf, train_x, train_y),
        "lr": lr,
        "weight_decay": wd,
        "grid_val_accuracy": grid,
        "n_train": len(train_y),
        "n_val": len(va),
        "n_test": len(test_y),
        "n_classes": n_classes,
        "feature_dim": int(train_x.shape[1]),
        "epochs": cfg.epochs,
    }
