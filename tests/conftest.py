"""Tests marked ``cuda`` need a CUDA GPU: they skip where PyTorch sees none (``scripts/gpu-check``
runs them on a GPU machine with ``pytest -m cuda``)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
