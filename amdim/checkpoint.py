"""Explicit checkpoint dicts: model, optimiser, scheduler, epoch, RNG states and the flat config.

Everything stored is a tensor or a plain Python value, so checkpoints load with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is opened). Writes go to a
temporary file that is renamed into place, so a crash mid-write never leaves a truncated file
where a good checkpoint was.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amdim.errors import CheckpointError

FORMAT = "amdim-checkpoint-v1"


def rng_state() -> dict[str, Any]:
    """The state of every RNG a training step draws from, as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # This process's own device only: a resume may see another number of GPUs (a trial
        # restarted on another node, a node type with more or fewer of them), and one process
        # trains on one device.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def cuda_state_for(saved: list[Any], device_index: int) -> Any | None:
    """The saved CUDA RNG state to give the current device: the one entry a checkpoint of this
    format holds (its process's device), or, from an older checkpoint that saved every visible
    GPU's state, the entry of the same index where there is one, else the first. None: none saved."""
    if not saved:
        return None
    return saved[device_index] if device_index < len(saved) else saved[0]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = cuda_state_for(state.get("cuda") or [], torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus the format tag) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`; any problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an {FORMAT} file")
    for key in ("config", "model", "n_classes", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return ckpt
