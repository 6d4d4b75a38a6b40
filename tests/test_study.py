"""Studies end to end: the shipped smoke spec on a real local Ray, a real SQLite MLflow store and a
real Optuna database; the confirm stage; rerun from an MLflow record; resume after the driver is
killed for real."""

from __future__ import annotations

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
from subprocess_env import FOREIGN, ROOT, run_amdim, start_amdim

from amdim import cli
from amdim.config import preset, to_flat
from amdim.harness.trial import registered_checkpoints

SMOKE = ROOT / "studies" / "smoke.yaml"
COMPLETE = optuna.trial.TrialState.COMPLETE

# The two ways a trial trains: the shipped smoke spec has one worker per trial, so its trials
# train in their Tune actors; its 2-worker variant keeps one Ray Train job per trial (one shorter
# trial: each pays the Train job's start-up; ASHA and Optuna's states are the Tune path's tests).
# The smoke spec at the size its own header gives for tests: the machinery, smaller trials.
SMOKE_TEST_SIZE = ["--data", "synthetic:n_train=1024,n_test=256", "--set", "train.max_steps_per_epoch=16"]
TRAIN_PATH = {
    "name": "smoke-train",
    "budget": {"trials": 1, "epochs": 2, "max_concurrent": 1, "workers": 2, "cpus_per_worker": 0.5},
}


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


def _checkpoint(run) -> dict:
    """The trial's latest checkpoint, where its MLflow run says Ray stored it."""
    path = Path(run.data.tags["checkpoint_path"])
    assert path.is_file(), path
    return torch.load(path, map_location="cpu", weights_only=True)


_RUNS: dict[str, tuple] = {}


def _study(path: str, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, str]:
    """`amdim study run SPEC` at the smoke spec's test size, as a user types it, in a fresh runs
    folder; once per path for the whole module."""
    if path not in _RUNS:
        runs = tmp_path_factory.mktemp(f"study-{path}") / "runs"
        spec = yaml.safe_load(SMOKE.read_text())
        if path == "train":
            spec["name"] = TRAIN_PATH["name"]
            spec["budget"].update(TRAIN_PATH["budget"])
        spec_path = runs.parent / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        proc = run_amdim(runs, "study", "run", str(SMOKE if path == "tune" else spec_path), *SMOKE_TEST_SIZE)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _RUNS[path] = (runs, proc, spec["name"])
    return _RUNS[path]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The shipped smoke study (single-worker trials: the Tune path)."""
    return _study("tune", tmp_path_factory)


@pytest.fixture(scope="module", params=["tune", "train"])
def either(request, tmp_path_factory):
    """The smoke study on each path: in the trials' own Tune actors, and as a Ray Train job each."""
    return (request.param, *_study(request.param, tmp_path_factory))


def test_smoke_study_runs_every_trial_to_a_final_state(either):
    path, runs, proc, name = either
    spec = yaml.safe_load(SMOKE.read_text())
    trials = spec["budget"]["trials"] if path == "tune" else TRAIN_PATH["budget"]["trials"]
    epochs = spec["budget"]["epochs"] if path == "tune" else TRAIN_PATH["budget"]["epochs"]
    assert f"search: {trials} trials" in proc.stdout
    assert "started:" in proc.stdout and f"epoch 1/{epochs}" in proc.stdout  # progress while it runs
    # Every trial is in Optuna with a final state; none is left running.
    study = _optuna(runs, name)
    assert len(study.trials) == trials
    assert all(
        t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials
    )
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    _, _, children = _children(runs, name)
    assert {r.data.tags["trial_path"] for r in children} == {path}
    for run in children:  # the driver measured every trial's start-up
        assert run.data.metrics["startup_s"] > 0
        # How busy the machine was: every finished trial, and on the Tune path (where ASHA stops a
        # trial inside its own process) every early-stopped one too.
        if path == "tune" or run.data.tags["state"] == "complete":
            assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100, run.info.run_name
    parent = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_run(_children(runs, name)[1])
    assert "system/cpu_utilization_percentage" in parent.data.metrics
    # Tune's own per-trial files, without its TensorBoard logger (which imports torch in the driver).
    trial_dirs = [d for d in (runs / "studies" / name / "tune" / "search").iterdir() if d.is_dir()]
    assert len(trial_dirs) == trials
    for d in trial_dirs:
        assert (d / "progress.csv").is_file() and (d / "result.json").is_file(), d
        assert not list(d.glob("events.out.tfevents*")), d


def test_child_runs_hold_exactly_optunas_samples_and_reach_the_model(either):
    path, runs, _, name = either
    client, parent, children = _children(runs, name)
    study = _optuna(runs, name)
    assert client.get_run(parent).data.tags["kind"] == "study"
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(children) == len(study.trials) >= 1
    by_trial = {r.data.tags["tune_trial_id"]: r for r in children}
    assert len(by_trial) == len(children)  # one child per Tune trial
    sampled_sets = []
    for t in study.trials:
        run = by_trial[t.user_attrs["tune_trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent
        # The child's parameters are the full flat config, and for the searched keys exactly
        # what Optuna sampled ...
        assert set(run.data.params) == set(to_flat(preset("tiny")))
        assert {k: run.data.params[k] for k in t.params} == {k: str(v) for k, v in t.params.items()}
        sampled_sets.append(tuple(sorted(t.params.items(), key=lambda kv: kv[0])))
        # ... and they reached the model: the checkpoint's config is the one the model was built with.
        built = _checkpoint(run)["config"]
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
        if path == "train":  # the trial's Train job had two workers
            assert run.data.metrics["workers"] == 2
    assert len(set(sampled_sets)) == len(sampled_sets)  # the trials differ from each other
    # The paper point ran first and is labelled.
    first = min(study.trials, key=lambda t: t.number)
    assert by_trial[first.user_attrs["tune_trial_id"]].data.tags["setting"] == "paper default"


def test_sampled_loss_settings_reach_the_built_model(smoke):
    """The model rebuilt from a trial's final checkpoint carries the sampled loss settings."""
    from amdim.trainer import model_from_checkpoint

    runs, _, name = smoke
    _, _, children = _children(runs, name)
    for run in children:
        model, _ = model_from_checkpoint(_checkpoint(run), "cpu")
        assert repr(model.loss_cfg.reg_weight) == run.data.params["loss.reg_weight"]
        assert str(model.loss_cfg.tclip) == run.data.params["loss.tclip"]


def _amdim_here(runs: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`amdim ARGS` in this process (commands that start no Ray: no interpreter start-up to pay)."""
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(runs))
    capsys.readouterr()
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_status_command(smoke, monkeypatch, capsys):
    runs, _, _ = smoke
    rc, out, err = _amdim_here(runs, monkeypatch, capsys, "study", "status", "smoke", "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert sum(status["stages"]["search"].values()) == len(_optuna(runs, "smoke").trials)
    assert status["best"]["number"] >= 0
    _, text, _ = _amdim_here(runs, monkeypatch, capsys, "study", "status", "smoke")
    assert "search:" in text and "best: trial" in text and "search stage: finished" in text
    assert "refused" not in text
    # A write the tracking server refused (kept for a person to read) is counted.
    refused = runs / "studies" / "smoke" / "tracking-spool" / "refused" / "1.jsonl"
    refused.parent.mkdir(parents=True, exist_ok=True)
    refused.write_text('{"kind": "metrics", "refused": "MlflowException: run deleted"}\n')
    try:
        _, text, _ = _amdim_here(runs, monkeypatch, capsys, "study", "status", "smoke")
        assert "1 trial record(s) refused by the tracking server" in text, text
    finally:
        refused.unlink()
    # With the tracking server down, the study's state still shows, from its folder and Optuna.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    capsys.readouterr()
    assert cli.main(["study", "status", "smoke"]) == 0
    text = capsys.readouterr().out
    assert (
        "search stage: finished" in text
        and "MLflow: MLflow tracking server http://127.0.0.1:9 does not answer" in text
    )
    assert "optuna: " in text and "best: trial" in text


def test_confirm_stage_and_rerun(smoke, monkeypatch, capsys):
    runs, _, _ = smoke
    # The best configuration and the labelled setting ("paper default"), 2 new seeds each: the
    # report's verdicts then compare two seeds with two (test_report_from_the_recorded_study).
    proc = run_amdim(runs, "study", "confirm", "smoke", "--top", "1", "--settings", "--seeds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, parent, children = _children(runs, "smoke")
    confirm = [r for r in children if r.data.tags["stage"] == "confirm"]
    best = max((t for t in _optuna(runs, "smoke").trials if t.value is not None), key=lambda t: t.value)
    paper = [r for r in confirm if r.data.tags.get("setting") == "paper default"]
    best_is_paper = all(r.data.tags.get("setting") == "paper default" for r in confirm)
    assert len(paper) == 2 and len(confirm) == (2 if best_is_paper else 4)
    assert {r.data.params["train.seed"] for r in paper} == {"2", "3"}
    confirm = [r for r in confirm if r.data.tags["confirm_of"] == str(best.number)]
    assert len(confirm) == 2
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
    rc, _, err = _amdim_here(
        runs, monkeypatch, capsys, "rerun", source.info.run_id, "--local", "--out", str(runs.parent / "rerun")
    )
    assert rc == 0, err
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
    "search": {
        "loss.reg_weight": {"type": "float", "low": 0.0, "high": 0.1},
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e8, "log": True},
        "loss.tclip": {"type": "choice", "values": [20.0, "off"]},
    },
    # Run in this order (one at a time). The third is the recipe for a run that diverges
    # within a few steps: a huge learning rate with both NCE stabilisers off.
    "points": [
        {"label": "first", "loss.reg_weight": 0.05, "optim.lr": 2e-4, "loss.tclip": 20.0},
        {"label": "second", "loss.reg_weight": 0.02, "optim.lr": 2e-4, "loss.tclip": 20.0},
        {"label": "diverges", "loss.reg_weight": 0.0, "optim.lr": 1e8, "loss.tclip": "off"},
    ],
    "budget": {"trials": 3, "epochs": 4, "max_concurrent": 1, "workers": 1, "cpus_per_worker": 1},
    "scheduler": {"type": "none"},
    "sampler": {"type": "random", "seed": 3},
}


def _checkpoint_saved(sdir: Path, path: str, trial_id: str) -> bool:
    """Whether a resumed study would find a checkpoint of the trial: on the Train path, one its
    Train run has committed; on the Tune path, one the Tune experiment state (saved by the driver
    every few seconds) records. A checkpoint folder can exist before either; a driver killed in
    between resumes from the previous one, by Ray's design."""
    if path == "train":
        snapshot = sdir / "train" / f"search-{trial_id}" / "checkpoint_manager_snapshot.json"
        return registered_checkpoints(snapshot) > 0
    # The run metadata Tune restores from: a reported checkpoint is registered there only once the
    # trial's save task has come back, after ``last_result`` already names it (CI caught a driver
    # killed in between, which by Ray's design restarts the trial from scratch).
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    for state in sorted((sdir / "tune" / "search").glob("experiment_state-*.json")):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue
        for info, runtime in trials:
            info = json.loads(info) if isinstance(info, str) else info
            if info.get("trial_id") != trial_id:
                continue
            runtime = runtime if isinstance(runtime, str) else json.dumps(runtime)
            meta = _TrainingRunMetadata.from_json_state(runtime)
            if meta.checkpoint_manager is not None and meta.checkpoint_manager.latest_checkpoint_result:
                return True
    return False


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"study exited early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the study")


@pytest.mark.parametrize("path", ["tune", pytest.param("train", marks=pytest.mark.slow)])
def test_a_study_survives_a_killed_trial_a_killed_driver_and_a_diverged_trial(
    tmp_path, path, monkeypatch, capsys
):
    """Three mishaps in one study. The process training the first trial is killed mid-way through
    its epoch 2 (its Tune actor, or its Train worker): the trial restarts from its epoch-1
    checkpoint and finishes. The driver is killed while the second trial trains: running the spec
    again reruns no finished trial, duplicates no child run, and the interrupted trial continues
    from its last saved checkpoint. The third trial's loss stops being finite: it ends diverged
    (MLflow FAILED, Optuna FAIL), the study goes on and ends normally, and the report counts it."""
    from amdim.harness.trial import FAULT_ENV

    runs, marker = tmp_path / "runs", tmp_path / "killed"
    spec_path = tmp_path / "resume.yaml"
    spec = json.loads(json.dumps(RESUME_SPEC))
    spec["budget"]["launcher"] = path
    if path == "tune":  # its epochs are quicker: longer trials leave the test time to catch one running
        spec["budget"]["epochs"] = 6
        spec["base"]["set"]["train.max_steps_per_epoch"] = 10
    spec_path.write_text(yaml.safe_dump(spec))
    sdir = runs / "studies" / "resume"
    # Own process group: the kill takes its Ray too. Tune saves its experiment state every 10 s
    # (at least); every 2 s here, so that short trials are caught with a checkpoint saved.
    proc = start_amdim(
        runs, "study", "run", str(spec_path),
        extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "2", FAULT_ENV: f"1:0:{marker}"},
    )  # fmt: skip
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
                _checkpoint_saved(sdir, path, t.user_attrs["tune_trial_id"]) for t in running
            )

        _wait_for(one_done_and_second_checkpointed, 300, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert marker.exists(), "the trial process was not killed"
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

    assert "diverged (non-finite loss at epoch 1, step" in again.stdout
    after = _optuna(runs, "resume").trials
    assert len(after) == spec["budget"]["trials"]  # the study continued its history
    states = {t.number: t.state for t in after}
    assert states == {0: COMPLETE, 1: COMPLETE, 2: optuna.trial.TrialState.FAIL}
    assert after[2].user_attrs["state"] == "diverged" and not after[2].intermediate_values
    client, _, children = _children(runs, "resume")
    by_tune_id = {r.data.tags["tune_trial_id"]: r for r in children}
    by_number = {t.number: by_tune_id[t.user_attrs["tune_trial_id"]] for t in after}
    ids = [r.data.tags["tune_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == spec["budget"]["trials"]  # no duplicate child runs
    for run in done_runs.values():  # finished trials were not trained again
        now = client.get_run(run.info.run_id)
        assert now.info.end_time == run.info.end_time
        assert len(client.get_metric_history(run.info.run_id, "epoch")) == spec["budget"]["epochs"]
    first = by_number[0]  # its process was killed in epoch 2: it went on from the epoch-1 checkpoint
    assert [m.value for m in client.get_metric_history(first.info.run_id, "restarted_at_epoch")] == [1]
    resumed = {m.step: m.value for m in client.get_metric_history(first.info.run_id, "resumed_from_epoch")}
    assert resumed == {e: (0 if e == 1 else 1) for e in range(1, spec["budget"]["epochs"] + 1)}
    assert first.data.tags["state"] == "complete"
    for tid in interrupted:  # the interrupted trial restarted from its checkpoint, not from scratch
        run = next(r for r in children if r.data.tags["tune_trial_id"] == tid)
        restarts = [m.value for m in client.get_metric_history(run.info.run_id, "restarted_at_epoch")]
        resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")]
        assert restarts and min(restarts) >= 1, (restarts, resumed)  # restarted from a checkpoint
        assert all(v == 0 or v in restarts for v in resumed)
        assert run.data.tags["state"] == "complete"
    diverged = by_number[2]
    assert (diverged.data.tags["state"], diverged.info.status) == ("diverged", "FAILED")
    assert diverged.data.tags["diverged_at"].startswith("epoch 1 step")
    assert "probe_val_accuracy" not in diverged.data.metrics and "checkpoint_path" not in diverged.data.tags
    rc, _, err = _amdim_here(
        runs, monkeypatch, capsys, "report", "resume", "--format", "csv", "--out", str(tmp_path / "r")
    )
    assert rc == 0, err
    import pandas as pd

    counts = pd.read_csv(tmp_path / "r" / "states.csv").set_index("stage").loc["search"]
    assert (counts["complete"], counts["diverged"], counts["total"]) == (2, 1, 3)


INVALID_SPEC = {
    "name": "invalid",
    "base": json.loads(json.dumps(RESUME_SPEC["base"])),
    # Each end of each range is valid against the base config (crop scales 0.3 to 1.0), so the
    # spec parses; the grid's point (0.6, 0.5) is not a valid config (min above max).
    "search": {
        "aug.crop_scale_min": {"type": "choice", "values": [0.2, 0.6]},
        "aug.crop_scale_max": {"type": "choice", "values": [0.5, 1.0]},
    },
    "budget": {"trials": 4, "epochs": 1, "max_concurrent": 1, "workers": 1, "cpus_per_worker": 1},
    "scheduler": {"type": "none"},
    "sampler": {"type": "grid", "seed": 0},
}
INVALID_SPEC["base"]["set"]["train.max_steps_per_epoch"] = 2


def test_an_invalid_combination_of_sampled_values_fails_once_on_the_record_and_the_study_goes_on(tmp_path):
    """Sampled values that are each valid but not together (a crop scale range with its minimum
    above its maximum) make a configuration that would fail on every try: the trial ends at once
    as failed, with the reason on its MLflow run and its Optuna trial (FAIL), is not restarted,
    and the study goes on with the other points."""
    runs, spec_path = tmp_path / "runs", tmp_path / "invalid.yaml"
    spec_path.write_text(yaml.safe_dump(INVALID_SPEC))
    proc = run_amdim(runs, "study", "run", str(spec_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Tune restarts it" not in proc.stdout  # no retry of a configuration that cannot work
    failed_lines = [ln for ln in proc.stdout.splitlines() if " failed: " in ln]
    assert len(failed_lines) == 1 and "crop_scale_min" in failed_lines[0], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    trials = _optuna(runs, "invalid").trials
    assert len(trials) == 4
    by_point = {(t.params["aug.crop_scale_min"], t.params["aug.crop_scale_max"]): t for t in trials}
    bad = by_point.pop((0.6, 0.5))
    assert bad.state == optuna.trial.TrialState.FAIL and bad.user_attrs["state"] == "failed"
    assert "crop_scale_min" in bad.user_attrs["error"]
    assert all(t.state == COMPLETE for t in by_point.values())
    _, _, children = _children(runs, "invalid")
    assert len(children) == 4  # every trial is on the record, the failed one too
    run = next(r for r in children if r.data.tags["tune_trial_id"] == bad.user_attrs["tune_trial_id"])
    assert (run.data.tags["state"], run.info.status) == ("failed", "FAILED")
    assert "crop_scale_min" in run.data.tags["error"]
    assert (run.data.params["aug.crop_scale_min"], run.data.params["aug.crop_scale_max"]) == ("0.6", "0.5")
    assert "epoch" not in run.data.metrics  # it never trained
    assert all(r.data.tags["state"] == "complete" for r in children if r is not run)


def test_an_invalid_combination_on_the_train_path_fails_before_any_train_job(tmp_path):
    """The same check on a trial of two workers: it ends as failed before it starts a Ray Train job."""
    spec = json.loads(json.dumps(INVALID_SPEC))
    spec["name"] = "invalid-train"
    spec["search"] = {"aug.crop_scale_min": {"type": "choice", "values": [0.6]},
                      "aug.crop_scale_max": {"type": "choice", "values": [0.5]}}  # fmt: skip
    spec["budget"].update(trials=1, workers=2, cpus_per_worker=0.5)
    runs, spec_path = tmp_path / "runs", tmp_path / "invalid.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = run_amdim(runs, "study", "run", str(spec_path))
    # Its only trial failed: the study exits non-zero, with the reason in one line.
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "amdim: error: study 'invalid-train': all 1 trials failed; the most common reason (1 of them): "
            "invalid configuration: aug.crop_scale_min"
        )
    ), proc.stderr[-2000:]
    assert "Tune restarts it" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    (trial,) = _optuna(runs, "invalid-train").trials
    assert trial.state == optuna.trial.TrialState.FAIL and "crop_scale_min" in trial.user_attrs["error"]
    _, _, (run,) = _children(runs, "invalid-train")
    assert (run.data.tags["state"], run.info.status, run.data.tags["trial_path"]) == (
        "failed",
        "FAILED",
        "train",
    )
    assert not list((runs / "studies" / "invalid-train" / "train").glob("*"))  # no Train run was started


def test_report_from_the_recorded_study(smoke, tmp_path, monkeypatch, capsys):
    runs, _, _ = smoke
    out = tmp_path / "report"
    rc, _, err = _amdim_here(
        runs, monkeypatch, capsys, "report", "smoke", "--format", "csv,md,tex", "--out", str(out)
    )
    assert rc == 0, err
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
    assert set(trials["dataset"]) == {SMOKE_TEST_SIZE[1]}  # the synthetic data's options make its images
    assert trials["best_online_val_acc"].between(0, 1).all()  # the smoke spec has the split
    curves = pd.read_csv(out / "curves.csv")
    assert curves["val_acc_lin"].between(0, 1).all() and curves["test_acc_lin"].between(0, 1).all()
    assert "paper default" in (out / "ablation.md").read_text()
    _check_report_numbers_against_mlflow(out, [r for r in children if r.data.tags["state"] == "complete"])
    rc, _, err = _amdim_here(
        runs, monkeypatch, capsys, "report", "smoke", "--format", "xlsx", "--out", str(out)
    )
    assert rc == 2 and "unknown format 'xlsx'" in err
    rc, _, err = _amdim_here(
        runs,
        monkeypatch,
        capsys,
        "report",
        "--compare",
        "smoke",
        "--format",
        "md",
        "--out",
        str(tmp_path / "cmp"),
    )
    assert rc == 0, err
    assert "smoke" in (tmp_path / "cmp" / "compare.md").read_text()


def _check_report_numbers_against_mlflow(out: Path, complete: list) -> None:
    """results.csv and verdicts.csv hold what the trials' own MLflow runs say: each configuration's
    seed count and mean (its confirm-stage runs where it has any), the ranking, and each verdict
    (Welch's test on the runs' metrics, or no verdict with one seed)."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    def preferred(rs):
        confirm = [r for r in rs if r.data.tags["stage"] == "confirm"]
        return confirm or rs

    by_config: dict[str, list] = {}
    for run in complete:
        by_config.setdefault(run.data.tags["config_id"], []).append(run)
    results = pd.read_csv(out / "results.csv", dtype={"config_id": str})
    assert set(results["config_id"]) == set(by_config)
    for _, row in results.iterrows():
        values = [r.data.metrics["probe_test_accuracy"] for r in preferred(by_config[row["config_id"]])]
        assert row["n_seeds"] == len(values) and row["mean"] == pytest.approx(np.mean(values), abs=1e-5)
    assert list(results["rank"]) == list(range(1, len(results) + 1))
    assert list(results["mean"]) == sorted(results["mean"], reverse=True)

    def runs_of(name: str) -> list:
        if name.startswith("config "):
            config_id = name.removeprefix("config ").split(":")[0]
            return [r for r in by_config[config_id] if r.data.tags["stage"] == "confirm"]
        return preferred([r for r in complete if r.data.tags.get("setting") == name])

    metrics = {
        "validation accuracy (offline probe)": "probe_val_accuracy",
        "test accuracy (offline probe)": "probe_test_accuracy",
    }
    reference = runs_of("paper default")  # the spec's first labelled point
    verdicts = pd.read_csv(out / "verdicts.csv", keep_default_na=False)
    confirmed = {r.data.tags["config_id"] for r in complete if r.data.tags["stage"] == "confirm"}
    labelled = {r.data.tags.get("config_id") for r in complete if r.data.tags.get("setting")}
    assert len(verdicts) == 2 * len(confirmed - labelled)  # the other groups, on both metrics
    for _, row in verdicts.iterrows():
        key = metrics[row["metric"]]
        a = [r.data.metrics[key] for r in runs_of(row["setting"])]
        b = [r.data.metrics[key] for r in reference]
        assert (row["n"], row["n_reference"]) == (len(a), len(b))
        assert float(row["mean"]) == pytest.approx(np.mean(a), abs=1e-5)
        if len(a) < 2 or len(b) < 2:
            assert row["verdict"] == "one seed: no verdict" and row["p"] == ""
        else:
            assert float(row["p"]) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-4)
            real = float(row["p_holm"]) < 0.05
            sign = "better" if np.mean(a) > np.mean(b) else "worse"
            assert row["verdict"] == (sign if real else "no detectable difference")


def test_export_takes_the_best_configuration_out_and_probe_and_segment_find_checkpoints_by_run(
    smoke, tmp_path, monkeypatch, capsys
):
    """The best configuration by the rank metric (never the test set) leaves the study folder as
    a checkpoint, its config and its run id; probe and segment find a run's checkpoint by its id."""
    from amdim import checkpoint as ckpt_io

    runs, _, name = smoke
    out = tmp_path / "best"
    rc, text, err = _amdim_here(runs, monkeypatch, capsys, "study", "export", name, "--out", str(out))
    assert rc == 0, err
    info = json.loads((out / "export.json").read_text())
    client, _, children = _children(runs, name)
    complete = [r for r in children if r.data.tags["state"] == "complete"]
    by_config: dict[str, list] = {}
    for r in complete:
        by_config.setdefault(r.data.tags["config_id"], []).append(r)

    def score(members):  # confirm-stage seeds where the confirm stage ran the configuration
        used = [r for r in members if r.data.tags["stage"] == "confirm"] or members
        return sum(r.data.metrics["probe_val_accuracy"] for r in used) / len(used)

    best_config = max(by_config, key=lambda c: (score(by_config[c]), c))  # ties: the larger config id
    assert info["config_id"] == best_config and info["metric"] == "probe_val_accuracy"
    assert info["mean"] == pytest.approx(score(by_config[best_config]))
    assert info["run_id"] in {r.info.run_id for r in by_config[best_config]} and info["run_id"] in text
    payload = ckpt_io.load(out / "checkpoint.pt")
    run = client.get_run(info["run_id"])
    assert json.loads((out / "config.json").read_text()) == payload["config"]
    assert {k: str(v) for k, v in payload["config"].items()} == run.data.params  # the run's config
    # probe --run finds the same checkpoint through the run's tag.
    rc, text, err = _amdim_here(runs, monkeypatch, capsys, "probe", "--run", info["run_id"], "--json")
    assert rc == 0, err
    assert json.loads(text)["checkpoint"] == run.data.tags["checkpoint_path"]
    # segment --run on a run without mixtures, or an unknown run: one line each.
    rc, _, err = _amdim_here(
        runs, monkeypatch, capsys, "segment", "--run", info["run_id"], "--out", str(tmp_path / "s.png")
    )
    assert rc == 2 and "trained without mixtures" in err and err.count("\n") == 1
    rc, _, err = _amdim_here(runs, monkeypatch, capsys, "probe", "--run", "0" * 32)
    assert rc == 2 and "not found" in err


def test_segment_by_run_id_of_a_mixture_run(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    rc, text, err = _amdim_here(
        runs, monkeypatch, capsys, "train", "--local", "--preset", "tiny", "--epochs", "1", "--no-probe",
        "--data", "synthetic:n_train=128,n_test=32", "--out", str(tmp_path / "mix"),
        "--set", "loss.n_mix=2", "--set", "train.max_steps_per_epoch=2", "--set", "data.batch_size=16",
    )  # fmt: skip
    assert rc == 0, err
    run_id = json.loads((tmp_path / "mix" / "metrics.json").read_text())["run_id"]
    png = tmp_path / "seg.png"
    rc, text, err = _amdim_here(
        runs, monkeypatch, capsys, "segment", "--run", run_id, "--out", str(png), "--n", "4"
    )
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 components" in text


def test_dashboard_serves_the_study_on_localhost(smoke):
    import socket
    import urllib.request

    runs, _, name = smoke
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_amdim(runs, "dashboard", name, "--port", str(port))
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer"
        (listed,) = [s for s in body["study_summaries"] if s["study_name"] == name]
        assert listed["directions"] == ["maximize"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # An unknown study is one line.
    bad = run_amdim(runs, "dashboard", "nope")
    assert bad.returncode == 2 and "no Optuna database for a study named 'nope'" in bad.stderr


def _interrupt_when_a_trial_ended_and_another_checkpointed(
    runs: Path, name: str, path: str, proc, every_trial: int = 0
) -> tuple[list[str], list[str]]:
    """Wait until one trial has ended and a running one has a checkpoint Tune would resume from
    (and, given ``every_trial``, until that many trials have started), then press Ctrl-C: SIGINT
    to the driver's whole process group, as a terminal sends it. Returns the Tune trial ids that
    were running then, and those of them with a checkpoint."""
    sdir = runs / "studies" / name
    found: dict[str, list[str]] = {}

    def ready() -> bool:
        if not (sdir / "optuna.db").exists():
            return False
        try:
            trials = _optuna(runs, name).trials
        except Exception:
            return False
        running = [
            t.user_attrs["tune_trial_id"]
            for t in trials
            if t.state.name == "RUNNING" and "tune_trial_id" in t.user_attrs
        ]
        found["running"] = running
        found["saved"] = [tid for tid in running if _checkpoint_saved(sdir, path, tid)]
        started = len(trials) >= every_trial
        return started and any(t.state.is_finished() for t in trials) and bool(found["saved"])

    _wait_for(ready, 300, proc)
    os.killpg(proc.pid, signal.SIGINT)
    return found["running"], found["saved"]


@pytest.mark.parametrize("path", ["tune", pytest.param("train", marks=pytest.mark.slow)])
def test_ctrl_c_then_the_same_command_finishes_the_study(tmp_path, path, monkeypatch, capsys):
    """Ctrl-C in the middle of the smoke study: the driver exits 130 saying the study was
    interrupted; the parent run is KILLED and `study status` says interrupted; the trials it
    stopped are KILLED (state interrupted) in MLflow and still running in Optuna, for Tune to
    resume. The same command then resumes the study to its end: every trial in a final state,
    none failed, no duplicate run, the interrupted ones continued from their checkpoints."""
    runs = tmp_path / "runs"
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = f"ctrl-c-{path}"
    spec["budget"].update({"trials": 4, "epochs": 3, "launcher": path})
    if path == "train":
        spec["budget"].update({"trials": 3, "workers": 2, "cpus_per_worker": 0.5, "max_concurrent": 1})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    name, trials = spec["name"], spec["budget"]["trials"]
    command = ("study", "run", str(spec_path), *SMOKE_TEST_SIZE)
    proc = start_amdim(runs, *command, extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "2"})
    try:
        # Once every trial has started, Tune's result grid alone cannot tell the trials Ctrl-C
        # stopped from finished ones (it marks both TERMINATED): the case that must say interrupted.
        running, saved = _interrupt_when_a_trial_ended_and_another_checkpointed(
            runs, name, path, proc, every_trial=trials
        )
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert f"amdim: study '{name}' interrupted; run the same command to resume it" in out
    assert "Traceback" not in out
    client, parent, children = _children(runs, name)
    assert client.get_run(parent).info.status == "KILLED"
    trials_then = _optuna(runs, name).trials
    assert running and all(t.state.name != "FAIL" for t in trials_then)
    # The trials Ctrl-C stopped (one may have finished just before it reached them): KILLED,
    # state interrupted in MLflow, still running in Optuna; no run is left RUNNING.
    still = {t.user_attrs["tune_trial_id"] for t in trials_then if t.state.name == "RUNNING"}
    stopped = [r for r in children if r.data.tags["tune_trial_id"] in still]  # (a trial Tune had not
    assert stopped  # started yet has no run)
    assert all((r.data.tags["state"], r.info.status) == ("interrupted", "KILLED") for r in stopped)
    assert all(r.info.status != "RUNNING" for r in children)
    rc, status, err = _amdim_here(runs, monkeypatch, capsys, "study", "status", name)
    assert rc == 0 and "search stage: interrupted; the same command resumes it" in status, status + err

    again = run_amdim(runs, *command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search stage" in again.stdout
    final = _optuna(runs, name).trials
    assert len(final) == trials and all(t.state.name in ("COMPLETE", "PRUNED") for t in final)
    client, parent, children = _children(runs, name)
    assert client.get_run(parent).info.status == "FINISHED"
    ids = [r.data.tags["tune_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == trials  # no duplicate run
    assert all(
        r.info.status in ("FINISHED", "KILLED") and r.data.tags["state"] in ("complete", "early_stopped")
        for r in children
    )
    for run in (r for r in children if r.data.tags["tune_trial_id"] in saved):
        restarts = [m.value for m in client.get_metric_history(run.info.run_id, "restarted_at_epoch")]
        assert restarts and min(restarts) >= 1, restarts  # continued from its checkpoint
    rc, status, _ = _amdim_here(runs, monkeypatch, capsys, "study", "status", name)
    assert "search stage: finished" in status


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_study_still_resumes(tmp_path):
    """Ctrl-C twice: the second one does not wait for Tune's final save; the driver still exits 130
    and the same command still runs the study to its end."""
    runs = tmp_path / "runs"
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "ctrl-c-twice"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    command = ("study", "run", str(spec_path), *SMOKE_TEST_SIZE)
    proc = start_amdim(runs, *command, extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "2"})
    try:
        _interrupt_when_a_trial_ended_and_another_checkpointed(runs, "ctrl-c-twice", "tune", proc)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert "amdim: interrupted" in out or "interrupted; run the same command" in out, out[-2000:]
    again = run_amdim(runs, *command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    final = _optuna(runs, "ctrl-c-twice").trials
    assert len(final) == spec["budget"]["trials"]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in final)
    _, _, children = _children(runs, "ctrl-c-twice")
    assert len({r.data.tags["tune_trial_id"] for r in children}) == len(children) == len(final)
