"""The environment the end-to-end tests start `amdim` (and `ray start`) with: the caller's, minus
anything that would point them at another tracking store, cluster or storage root, plus a fresh
runs folder."""

from __future__ import annotations

import os
from pathlib import Path

FOREIGN = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AMDIM_STORAGE")


def clean_env(runs: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update({"AMDIM_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"})
    return env
