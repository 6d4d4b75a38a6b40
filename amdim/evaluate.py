"""What a finished training run is judged by, for every launcher (local, Ray Train, study trials).

The offline linear probe of the frozen encoder (spec 6.3, :func:`evaluate_encoder`)
and, when the model has mixture components, the segmentation they induce over test images, written
as a PNG grid (spec section 4). Pure PyTorch: the callers record the results where they belong.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from amdim import data as data_mod
from amdim.config import Config
from amdim.linear_eval import extract_features, linear_probe
from amdim.model import AMDIM


def evaluate_encoder(encoder: nn.Module, bundle: Any, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Extract features of the labelled training set and the test set, then :func:`linear_probe`.

    Args:
        encoder: the frozen encoder. bundle: an :class:`amdim.data.DataBundle`.
        cfg: the full :class:`amdim.config.Config` (image size, test transform, probe grid).
    """

    def batches(images: Any, labels: Tensor) -> Iterable[tuple[Tensor, Tensor]]:
        return data_mod.eval_loader(
            images, labels, cfg.aug, cfg.model.image_size, cfg.probe.batch_size, bundle.mean, bundle.std
        )

    train_x, train_y = extract_features(encoder, batches(bundle.probe_images, bundle.probe_labels), device)
    test_x, test_y = extract_features(encoder, batches(bundle.test_images, bundle.test_labels), device)
    return linear_probe(train_x, train_y, test_x, test_y, cfg.probe)


def write_segmentation(model: AMDIM, cfg: Config, bundle: Any, out: Path, *, n: int, device) -> Path:
    """Mixture-component maps of the first ``n`` test images, written as a PNG grid."""
    from amdim.mixture import save_segmentation_grid, segment
    from amdim.nce import mix_alpha

    n = max(2, min(n, len(bundle.test_labels)))  # the segmentation scores need negatives
    x, _ = next(iter(data_mod.eval_loader(
        bundle.test_images, bundle.test_labels, cfg.aug, cfg.model.image_size, n, bundle.mean, bundle.std
    )))  # fmt: skip
    was_training = model.training
    model.eval()
    with torch.no_grad():
        r1, _, r7 = model.encoder(x.to(device))
        assign = segment(r1, r7, model.mixture, mix_alpha(cfg.loss), tclip=cfg.loss.tclip)
    model.train(was_training)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_segmentation_grid((x * std + mean).clamp(0, 1), assign.cpu(), out, cfg.loss.n_mix)


def final_evaluation(
    model: AMDIM,
    cfg: Config,
    bundle: Any,
    device: torch.device,
    *,
    epoch: int,
    probe: bool = True,
    segmentation: Path | None = None,
) -> dict[str, Any]:
    """The offline probe (``probe``: its result dict, with ``epoch`` and ``time_s``) and, for a
    model with mixtures, the segmentation PNG at ``segmentation`` (``segmentation``: its path)."""
    out: dict[str, Any] = {}
    if probe:
        t0 = time.perf_counter()
        result = evaluate_encoder(model.encoder, bundle, cfg, device)
        result["time_s"] = time.perf_counter() - t0
        result["epoch"] = epoch
        out["probe"] = result
    if segmentation is not None and model.mixture is not None:
        out["segmentation"] = write_segmentation(model, cfg, bundle, segmentation, n=16, device=device)
    return out
