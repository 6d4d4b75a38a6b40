"""MLflow system metrics on every run: CPU and memory (and GPU utilisation where NVML sees a GPU)
while it trains, including a run shorter than the sampling interval; none with
train.system_metrics_s=0."""

from __future__ import annotations

import json

import mlflow
import pytest
from subprocess_env import FOREIGN

from amdim import cli


@pytest.mark.parametrize("every, logged", [("30", True), ("0", False)])
def test_a_local_run_records_how_busy_the_machine_was(tmp_path, monkeypatch, capsys, every, logged):
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    out = tmp_path / "out"
    argv = ["train", "--local", "--preset", "tiny", "--epochs", "1", "--no-probe", "--out", str(out),
            "--data", "synthetic:n_train=128,n_test=32", "--set", "train.max_steps_per_epoch=2",
            "--set", "data.batch_size=16", "--set", f"train.system_metrics_s={every}"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    metrics = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(run_id).data.metrics
    system = {k: v for k, v in metrics.items() if k.startswith("system/")}
    if logged:  # a 30 s interval and a run of a few seconds: the final, partial sample is kept
        assert 0 <= system["system/cpu_utilization_percentage"] <= 100
        assert system["system/system_memory_usage_megabytes"] > 0
    else:
        assert not system
