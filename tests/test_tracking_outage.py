"""Training never waits for the tracking server.

A real ``scripts/tracking-server`` (an ``mlflow server`` with a SQLite store) is stopped while the
smoke study runs, for longer than the MLflow client's retry window (shortened here, as the test
says), and then started again on the same store. The trials train on through the outage; what
they could not log arrives once the server is back (kept in the study's spool where a trial
ended meanwhile, and sent by the driver); no run is left RUNNING, none is duplicated, no metric
is lost, and the study ends as it would have.

Slow: about two minutes on 2 cores (two server starts, the study, the outage).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from ray_nodes import free_port
from subprocess_env import ROOT, start_amdim

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "scripts" / "tracking-server"
# The client's retry window with these settings: 2 retries after 1 and 2 s (plus up to 1 s of
# jitter each), each try timing out after 5 s: under 20 s. The outage lasts longer.
SHORT_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "AMDIM_TRACKING_FLUSH_S": "5",
}
OUTAGE_S = 30


def _server(action: str, port: int, tmp: Path, env: dict) -> subprocess.CompletedProcess:
    args = [str(SCRIPT), action, "--pid-file", str(tmp / "server.pid")]
    if action == "start":
        args += ["--host", "127.0.0.1", "--port", str(port), "--timeout", "90"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_a_study_trains_on_through_a_tracking_server_outage(tmp_path, request):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server_env.update(AMDIM_STORAGE=str(tmp_path / "store"), AMDIM_RUNS_DIR=str(tmp_path / "server"))
    request.addfinalizer(lambda: _server("stop", port, tmp_path, server_env))
    assert _server("start", port, tmp_path, server_env).returncode == 0
    runs = tmp_path / "runs"
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    spec["name"] = "outage"
    spec["budget"]["epochs"] = 6  # and 48 steps an epoch: the outage ends well before the study
    spec["scheduler"] = {"type": "none"}  # every trial runs its six epochs
    spec_path = tmp_path / "outage.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    sdir = runs / "studies" / "outage"
    proc = start_amdim(
        runs, "study", "run", str(spec_path), "--data", "synthetic:n_train=1024,n_test=256",
        "--set", "train.max_steps_per_epoch=48", extra_env={"MLFLOW_TRACKING_URI": uri, **SHORT_RETRIES},
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # until a trial has ended: the study is in full swing
            with contextlib.suppress(Exception):
                trials = optuna.load_study(
                    study_name="outage", storage=f"sqlite:///{sdir / 'optuna.db'}"
                ).trials
                if any(t.state.is_finished() for t in trials):
                    break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        stopped_at = time.time()
        assert _server("stop", port, tmp_path, server_env).returncode == 0
        time.sleep(OUTAGE_S)
        back_at = time.time()
        assert _server("start", port, tmp_path, server_env).returncode == 0
        assert proc.poll() is None, "the study ended during the outage: make its trials longer"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    print(f"\noutage {back_at - stopped_at:.0f} s; the study's output:\n{out[-2500:]}")
    assert "search stage: finished" in out and "search: 6 trials" in out, out[-3000:]

    # Tune's own record of every result (it never waited for MLflow): some came during the outage.
    results = {}
    for trial_dir in (sdir / "tune" / "search").iterdir():
        if (trial_dir / "result.json").is_file():
            rows = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]
            results[rows[0]["trial_id"]] = rows
    during = [r for rows in results.values() for r in rows if stopped_at < r["timestamp"] < back_at]
    assert len(during) >= 2, "no trial trained on while the tracking server was down"

    client = mlflow.MlflowClient(uri)
    state = json.loads((sdir / "state.json").read_text())
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    children = client.search_runs(
        [client.get_experiment_by_name("outage").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
    )
    ids = [r.data.tags["tune_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == 6 == len(results)  # every trial once
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED"), (run.info.run_name, run.info.status)
        assert run.data.tags["state"] in ("complete", "early_stopped")
        # No metric lost: every epoch Tune saw is in MLflow.
        tune_epochs = {r["epoch"] for r in results[run.data.tags["tune_trial_id"]] if "val_acc_lin" in r}
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "val_acc_lin")}
        assert logged == tune_epochs, (run.info.run_name, logged, tune_epochs)
        if run.data.tags["state"] == "complete":
            assert "probe_val_accuracy" in run.data.metrics
    assert not list((sdir / "tracking-spool").glob("*.jsonl"))  # everything spooled was sent
