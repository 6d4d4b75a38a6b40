"""Failures a retry would repeat end a trial once, with their reason; crashes are retried, once.

A trial whose data cannot be read, whose configuration is invalid, or that runs out of memory
fails the same way on every try: it ends as failed at once, the reason on its MLflow run and its
Optuna trial. A process that dies is restarted from its last checkpoint, by Tune alone (Ray Train
retries nothing itself, so the two never multiply). Data that cannot be read at all is refused
before Ray starts; a study in which every trial failed exits 4 with the most common reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from subprocess_env import run_amdim
from test_study import INVALID_SPEC, _children, _optuna

from amdim import cli
from amdim.errors import ConfigError, DataError, repeats_on_retry


def _npz(path: Path, n: int = 256) -> Path:
    g = np.random.default_rng(0)
    np.savez(
        path,
        x_train=g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
        y_train=np.arange(n) % 4,
        x_test=g.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
        y_test=np.arange(64) % 4,
    )
    return path


def _damaged(path: Path) -> Path:
    """An npz whose directory and array headers are intact (the launchers' check passes) but whose
    x_train data is not: only loading it finds the damage."""
    data = bytearray(_npz(path).read_bytes())
    start = data.index(b"\x93NUMPY", data.index(b"x_train.npy")) + 4096
    data[start : start + 256] = bytes(256)
    path.write_bytes(bytes(data))
    return path


def test_what_a_retry_would_repeat():
    from ray.train import ControllerError, WorkerGroupError

    from amdim.harness.ray_train import failed_job

    assert repeats_on_retry(DataError("npz:/d.npz: cannot read")) == "DataError: npz:/d.npz: cannot read"
    assert repeats_on_retry(ConfigError("model.ndf: must be >= 1")).startswith("ConfigError")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert repeats_on_retry(oom) == "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert repeats_on_retry(RuntimeError("NCCL error: unhandled system error")) is None
    # A Ray Train job: the first worker failure a retry would repeat decides, whichever rank it is on.
    job = WorkerGroupError("rank 1 failed", {0: RuntimeError("connection reset by peer"), 1: oom})
    assert failed_job(job) == ("out of memory: CUDA out of memory. Tried to allocate 20.00 GiB", True)
    assert failed_job(WorkerGroupError("died", {0: RuntimeError("Connection reset")}))[1] is False
    assert failed_job(ControllerError(RuntimeError("worker group startup timed out")))[1] is False
    assert failed_job(DataError("npz:x: bad")) == ("DataError: npz:x: bad", True)  # the Tune path: raw


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AMDIM_STORAGE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


def test_data_that_cannot_be_read_is_refused_before_ray_starts(isolated, capsys):
    """A text file given as npz:PATH, and an npz cut short: one line and exit 2, before Ray starts
    and before anything is written; `amdim train --local` and `amdim train` alike."""
    import ray

    text = isolated / "labels.npz"
    text.write_text("x_train,y_train\n1,2\n")
    truncated = isolated / "cut.npz"
    truncated.write_bytes(_npz(isolated / "whole.npz").read_bytes()[:5000])
    spec = json.loads(json.dumps(INVALID_SPEC))
    spec["search"] = {"loss.reg_weight": {"type": "float", "low": 0.0, "high": 0.1}}
    spec["sampler"] = {"type": "random", "seed": 0}
    for path in (text, truncated):
        spec["base"]["data"] = f"npz:{path}"
        spec_path = isolated / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        for args in (
            ["study", "run", str(spec_path)],
            ["train", "--local", "--data", f"npz:{path}", "--out", str(isolated / "out")],
            ["train", "--data", f"npz:{path}", "--out", str(isolated / "out")],
        ):
            assert cli.main(args) == 2, args
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and f"npz:{path}: not a readable .npz archive" in err, err
    assert not ray.is_initialized()
    assert not (isolated / "runs" / "mlflow.db").exists() and not (isolated / "out").exists()


@pytest.mark.parametrize("path", ["tune", pytest.param("train", marks=pytest.mark.slow)])
def test_a_trial_whose_data_fails_to_load_fails_once_and_the_study_says_why(tmp_path, path):
    """The launcher's check cannot see damage inside an array: every trial then fails loading it
    (in its Tune actor, or in both workers of its Train job). Each ends failed on its first try (no
    restart), with the reason on its MLflow run and Optuna trial, and the study exits 4 naming the
    most common reason."""
    damaged = _damaged(tmp_path / "damaged.npz")
    spec = json.loads(json.dumps(INVALID_SPEC))
    spec.update(name="unreadable", sampler={"type": "random", "seed": 0})
    spec["base"]["data"] = f"npz:{damaged}"
    spec["search"] = {"loss.reg_weight": {"type": "float", "low": 0.0, "high": 0.1}}
    spec["budget"].update(trials=2, max_failures=2)
    if path == "train":
        spec["budget"].update(workers=2, cpus_per_worker=0.5)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    proc = run_amdim(runs, "study", "run", str(spec_path))
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("amdim: error: study 'unreadable': all 2 trials failed; the most common reason")
    assert "DataError" in last and "CRC" in last, last
    assert "Tune restarts it" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    trials = _optuna(runs, "unreadable").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("DataError" in t.user_attrs["error"] for t in trials)
    _, _, children = _children(runs, "unreadable")
    assert len(children) == 2
    for run in children:
        assert (run.data.tags["state"], run.info.status) == ("failed", "FAILED")
        assert "CRC" in run.data.tags["error"] and "epoch" not in run.data.metrics


@pytest.mark.slow
def test_a_crashing_train_path_trial_is_retried_by_tune_alone(tmp_path):
    """A Train-path trial whose worker crashes at every start is started max_failures + 1 times in
    all (Tune's retries; Ray Train's own would have multiplied them), each from the trial's last
    checkpoint, and then ends failed."""
    from amdim.harness.trial import FAULT_ENV

    spec = json.loads(json.dumps(INVALID_SPEC))
    spec.update(name="crashing", sampler={"type": "random", "seed": 0})
    spec["search"] = {"loss.reg_weight": {"type": "float", "low": 0.0, "high": 0.1}}
    spec["base"]["set"]["train.max_steps_per_epoch"] = 4
    spec["budget"].update(trials=1, epochs=3, workers=2, cpus_per_worker=0.5, max_failures=1)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    # Rank 0 raises in epoch 2, every time: its marker lies in a folder that does not exist.
    proc = run_amdim(runs, "study", "run", str(spec_path), extra_env={FAULT_ENV: f"1:0:{tmp_path}/no/marker"})
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Tune restarts it") == 1  # max_failures = 1
    (run,) = _children(runs, "crashing")[2]
    client = __import__("mlflow").MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    starts = client.get_metric_history(run.info.run_id, "restarted_at_epoch")
    assert [m.value for m in starts] == [1]  # one restart, from the epoch-1 checkpoint
    assert (run.data.tags["state"], run.info.status) == ("failed", "FAILED")
    (trial,) = _optuna(runs, "crashing").trials
    assert trial.state == optuna.trial.TrialState.FAIL
