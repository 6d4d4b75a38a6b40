"""The environment the end-to-end tests start `amdim` (and `ray start`) with: the caller's, minus
anything that would point them at another tracking store, cluster or storage root, plus a fresh
runs folder; and the two ways they start `amdim` as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOREIGN = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AMDIM_STORAGE")


def clean_env(runs: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update({"AMDIM_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"})
    return env


def run_amdim(
    runs: Path, *args: str, timeout: float = 400, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`amdim ARGS` from the repository root, to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "amdim.cli", *args],
        cwd=ROOT,
        env={**clean_env(runs), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_amdim(runs: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`amdim ARGS` started in its own process group (so that killing the group takes its local Ray
    with it), stdout and stderr merged."""
    return subprocess.Popen(
        [sys.executable, "-m", "amdim.cli", *args],
        cwd=ROOT,
        env={**clean_env(runs), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
