"""Studies end to end: the shipped smoke spec on a real local Ray, a real SQLite MLflow store and a
real Optuna database; the confirm stage; rerun from an MLflow record; resume after the driver is
killed for real."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from subprocess_env import ROOT, run_amdim, start_amdim

SMOKE = ROOT / "studies" / "smoke.yaml"


def _children(runs: Path, name: str):
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    state = json.loads((runs / "studies" / name / "state.json").read_text())
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    )
    return client, state["parent_run_id"], found


def _optuna(runs: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'studies' / name / 'optuna.db'}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`amdim study run studies/smoke.yaml`, exactly as a user types it, in a fresh runs folder."""
    runs = tmp_path_factory.mktemp("study") / "runs"
    t0 = time.perf_counter()
    proc = run_amdim(runs, "study", "run", str(SMOKE))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs, proc, wall


def test_smoke_study_completes_in_budget(smoke):
    runs, proc, wall = smoke
    assert wall < 180, f"smoke study took {wall:.0f} s"
    spec = yaml.safe_load(SMOKE.read_text())
    assert f"search: {spec['budget']['trials']} trials" in proc.stdout
    assert "started:" in proc.stdout and "epoch 1/3" in proc.stdout  # progress while it runs
    # Every trial is in Optuna with a final state; none is left running.
    study = _optuna(runs, "smoke")
    assert len(study.trials) == spec["budget"]["trials"]
    assert all(
        t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials
    )
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_child_runs_hold_exactly_optunas_samples_and_reach_the_model(smoke):
    runs, _, _ = smoke
    client, parent, children = _children(runs, "smoke")
    study = _optuna(runs, "smoke")
    assert client.get_run(parent).data.tags["kind"] == "study"
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(children) == len(study.trials) >= 3
    by_trial = {r.data.tags["tune_trial_id"]: r for r in children}
    assert len(by_trial) == len(children)  # one child per Tune trial
    sampled_sets = []
    for t in study.trials:
        run = by_trial[t.user_attrs["tune_trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent
        # The child's parameters for the searched keys are exactly what Optuna sampled ...
        assert {k: run.data.params[k] for k in t.params} == {k: str(v) for k, v in t.params.items()}
        sampled_sets.append(tuple(sorted(t.params.items(), key=lambda kv: kv[0])))
        # ... and they reached the model: the Train checkpoint's config is the one the model was built with.
        ckpts = sorted(
            glob.glob(
                str(
                    runs
                    / "studies"
                    / "smoke"
                    / "train"
                    / f"search-{run.data.tags['tune_trial_id']}"
                    / "checkpoint_*"
                    / "checkpoint.pt"
                )
            )
        )
        assert ckpts, "no Train checkpoint for the trial"
        built = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["config"]
        assert {k: str(built[k]) for k in t.params} == {k: str(v) for k, v in t.params.items()}
        # State agrees between Optuna and MLflow.
        expected = {"COMPLETE": ("complete", "FINISHED"), "PRUNED": ("early_stopped", "KILLED")}[t.state.name]
        assert (run.data.tags["state"], run.info.status) == expected
        # ASHA's signal (Optuna's intermediate values) is the online probe on the held-out
        # validation split, epoch by epoch, never the test set.
        val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc_lin")}
        assert t.intermediate_values and t.intermediate_values == pytest.approx(val)
        if t.state.name == "COMPLETE":
            assert run.data.metrics["probe_val_accuracy"] == pytest.approx(t.value)
            assert "probe_test_accuracy" in run.data.metrics and run.data.tags["probe_protocol"]
    assert len(set(sampled_sets)) == len(sampled_sets)  # the trials differ from each other
    # The paper point ran first and is labelled.
    first = min(study.trials, key=lambda t: t.number)
    assert by_trial[first.user_attrs["tune_trial_id"]].data.tags["setting"] == "paper default"


def test_sampled_loss_settings_reach_the_built_model(smoke):
    """The model rebuilt from a trial's final checkpoint carries the sampled loss settings."""
    from amdim import checkpoint as ckpt_io
    from amdim.trainer import model_from_checkpoint

    runs, _, _ = smoke
    _, _, children = _children(runs, "smoke")
    for run in children:
        tid = run.data.tags["tune_trial_id"]
        ckpt = sorted(
            glob.glob(
                str(runs / "studies" / "smoke" / "train" / f"search-{tid}" / "checkpoint_*" / "checkpoint.pt")
            )
        )[-1]
        model, _ = model_from_checkpoint(ckpt_io.load(ckpt), "cpu")
        assert repr(model.loss_cfg.reg_weight) == run.data.params["loss.reg_weight"]
        assert str(model.loss_cfg.tclip) == run.data.params["loss.tclip"]


def test_status_command(smoke):
    runs, _, _ = smoke
    proc = run_amdim(runs, "study", "status", "smoke", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert sum(status["stages"]["search"].values()) == len(_optuna(runs, "smoke").trials)
    assert status["best"]["number"] >= 0
    text = run_amdim(runs, "study", "status", "smoke").stdout
    assert "search:" in text and "best: trial" in text


def test_confirm_stage_and_rerun(smoke):
    runs, _, _ = smoke
    proc = run_amdim(runs, "study", "confirm", "smoke", "--top", "1", "--seeds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, parent, children = _children(runs, "smoke")
    confirm = [r for r in children if r.data.tags["stage"] == "confirm"]
    assert len(confirm) == 2
    best = max((t for t in _optuna(runs, "smoke").trials if t.value is not None), key=lambda t: t.value)
    for run in confirm:
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["confirm_of"] == str(best.number)
        assert {k: run.data.params[k] for k in best.params} == {k: str(v) for k, v in best.params.items()}
        assert run.data.tags["state"] == "complete" and "probe_test_accuracy" in run.data.metrics
    assert {r.data.params["train.seed"] for r in confirm} == {"2", "3"}  # new seeds, not the search's

    # Rerun a trial from its MLflow record alone.
    source = next(
        r for r in children if r.data.tags["stage"] == "search" and r.data.tags["state"] == "complete"
    )
    proc = run_amdim(runs, "rerun", source.info.run_id, "--local", "--out", str(runs.parent / "rerun"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rerun = client.search_runs(
        [source.info.experiment_id], filter_string=f"tags.rerun_of = '{source.info.run_id}'"
    )
    assert len(rerun) == 1
    assert rerun[0].data.params == source.data.params
    assert rerun[0].data.metrics["epoch"] == source.data.metrics["epoch"]


def test_rerun_unknown_run_is_one_line(tmp_path):
    proc = run_amdim(tmp_path / "runs", "rerun", "0123456789abcdef0123456789abcdef", "--local")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and (
        "not found" in proc.stderr or "no MLflow store" in proc.stderr
    )


RESUME_SPEC = {
    "name": "resume",
    "base": {
        "preset": "tiny",
        "data": "synthetic:n_train=512,n_test=128",
        "set": {
            "model.ndf": 16,
            "model.n_rkhs": 128,
            "model.mlp_hidden": 64,
            "data.batch_size": 32,
            "train.max_steps_per_epoch": 6,
            "optim.warmup_steps": 2,
            "probe.epochs": 2,
            "probe.lrs": "0.01",
            "probe.weight_decays": "0",
        },
    },
    "search": {"loss.reg_weight": {"type": "float", "low": 0.0, "high": 0.1}},
    "budget": {"trials": 3, "epochs": 4, "max_concurrent": 1, "workers": 1, "cpus_per_worker": 1},
    "scheduler": {"type": "none"},
    "sampler": {"type": "random", "seed": 3},
}


def _registered_checkpoints(sdir: Path, trial_id: str) -> int:
    """Checkpoints Ray Train has committed for a trial's run (a checkpoint folder can exist before
    it is registered; a driver killed in between resumes from the previous one, by Ray's design)."""
    snapshot = sdir / "train" / f"search-{trial_id}" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"study exited early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the study")


def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path):
    runs = tmp_path / "runs"
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(RESUME_SPEC))
    sdir = runs / "studies" / "resume"
    proc = start_amdim(runs, "study", "run", str(spec_path))  # own process group: the kill takes its Ray too
    try:

        def one_done_and_second_checkpointed() -> bool:
            if not (sdir / "optuna.db").exists():
                return False
            try:
                trials = _optuna(runs, "resume").trials
            except Exception:
                return False
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            running = [
                t
                for t in trials
                if t.state == optuna.trial.TrialState.RUNNING and "tune_trial_id" in t.user_attrs
            ]
            return bool(done) and any(
                _registered_checkpoints(sdir, t.user_attrs["tune_trial_id"]) for t in running
            )

        _wait_for(one_done_and_second_checkpointed, 300, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _optuna(runs, "resume").trials
    done_before = {
        t.user_attrs["tune_trial_id"]: t for t in before if t.state == optuna.trial.TrialState.COMPLETE
    }
    interrupted = [
        t.user_attrs["tune_trial_id"] for t in before if t.state == optuna.trial.TrialState.RUNNING
    ]
    _, _, children_before = _children(runs, "resume")
    done_runs = {
        r.data.tags["tune_trial_id"]: r for r in children_before if r.data.tags["state"] == "complete"
    }
    assert set(done_runs) == set(done_before)

    again = run_amdim(runs, "study", "run", str(spec_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search stage" in again.stdout

    after = _optuna(runs, "resume").trials
    assert len(after) == RESUME_SPEC["budget"]["trials"]  # the study continued its history
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after)
    client, _, children = _children(runs, "resume")
    ids = [r.data.tags["tune_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == RESUME_SPEC["budget"]["trials"]  # no duplicate child runs
    for run in done_runs.values():  # finished trials were not trained again
        now = client.get_run(run.info.run_id)
        assert now.info.end_time == run.info.end_time
        assert len(client.get_metric_history(run.info.run_id, "epoch")) == RESUME_SPEC["budget"]["epochs"]
    for tid in interrupted:  # the interrupted trial restarted from its checkpoint, not from scratch
        run = next(r for r in children if r.data.tags["tune_trial_id"] == tid)
        restarts = [m.value for m in client.get_metric_history(run.info.run_id, "restarted_at_epoch")]
        resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")]
        assert restarts and min(restarts) >= 1, (restarts, resumed)  # restarted from a checkpoint
        assert all(v == 0 or v in restarts for v in resumed)
        assert run.data.tags["state"] == "complete"


def test_report_from_the_recorded_study(smoke, tmp_path):
    runs, _, _ = smoke
    out = tmp_path / "report"
    proc = run_amdim(runs, "report", "smoke", "--format", "csv,md,tex", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results", "states", "ablation"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    for png in ("importance", "parallel", "curves", "curves_val", "online_vs_offline"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    trials = pd.read_csv(out / "trials.csv")
    _, _, children = _children(runs, "smoke")
    assert len(trials) == len(children)
    assert set(trials["state"]) <= {"complete", "early_stopped"}
    assert trials["best_online_val_acc"].between(0, 1).all()  # the smoke spec has the split
    curves = pd.read_csv(out / "curves.csv")
    assert curves["val_acc_lin"].between(0, 1).all() and curves["test_acc_lin"].between(0, 1).all()
    assert "paper default" in (out / "ablation.md").read_text()
    bad = run_amdim(runs, "report", "smoke", "--format", "xlsx", "--out", str(out))
    assert bad.returncode == 2 and "unknown format 'xlsx'" in bad.stderr
    compare = run_amdim(
        runs, "report", "--compare", "smoke", "--format", "md", "--out", str(tmp_path / "cmp")
    )
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert "smoke" in (tmp_path / "cmp" / "compare.md").read_text()
