"""The study-throughput benchmark, end to end on a tiny budget (slow: about 2 minutes on 2 cores).

`python -m analysis.bench_studies packing` runs the packing spec through the real study runner
(local Ray, Optuna on SQLite, MLflow on SQLite) and must account for exactly the images the trials
trained: 4 trials x 2 epochs x steps x batch.

    ./dev test -m slow tests/test_bench_packing.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import clean_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_packing_benchmark_accounts_for_every_image(tmp_path):
    steps, batch = 3, 32
    proc = subprocess.run(
        [
            sys.executable, "-m", "analysis.bench_studies", "packing", "--runs", str(tmp_path),
            "--shares", "0.75", "--set", f"train.max_steps_per_epoch={steps}", "--set", f"data.batch_size={batch}",
            "--set", "model.ndf=16", "--set", "model.n_rkhs=128", "--set", "model.mlp_hidden=64",
        ],
        cwd=ROOT, env=clean_env(tmp_path / "runs"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n") :])  # progress lines come first
    (row,) = result["arrangements"]
    assert row["cpus_per_worker"] == 0.75 and row["trials"] == 4
    assert row["images_trained"] == 4 * 2 * steps * batch
    assert row["trials_at_once"] == min(4, os.cpu_count() or 1)  # each trial holds 0.75 + 0.25 (driver) CPUs
    assert row["torch_threads_per_trial"] == ["1"]
    assert row["summed_training_images_per_s"] == pytest.approx(2 * row["mean_trial_images_per_s"], rel=1e-3)
    assert row["study_images_per_s"] == pytest.approx(row["images_trained"] / row["wall_s"], rel=1e-2)
