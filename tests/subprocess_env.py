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


# `amdim` as a driver on a machine without CUDA, stricter: any CUDA query in this process raises
# (the workers Ray starts are other processes, untouched).
HIDDEN_CUDA = (
    "import sys, torch\n"
    "def hidden(*args, **kwargs):\n"
    "    raise AssertionError('the driver queried CUDA')\n"
    "for name in ('is_available', 'device_count', 'get_device_name', 'current_device', 'init', 'get_rng_state'):\n"
    "    setattr(torch.cuda, name, hidden)\n"
    "from amdim.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_amdim(
    runs: Path,
    *args: str,
    timeout: float = 400,
    extra_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    hide_cuda: bool = False,
) -> subprocess.CompletedProcess:
    """`amdim ARGS` from the repository root, to completion, output captured; ``env`` replaces
    :func:`clean_env`'s environment, ``hide_cuda`` runs it with :data:`HIDDEN_CUDA`."""
    entry = ["-c", HIDDEN_CUDA] if hide_cuda else ["-m", "amdim.cli"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        env={**(env if env is not None else clean_env(runs)), **(extra_env or {})},
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
