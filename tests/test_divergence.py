"""A run whose loss stops being finite stops at once and is never recorded as a result: `amdim
train` exits 3 with one line and leaves no checkpoint, and in a study the trial ends diverged
(MLflow FAILED, Optuna FAIL) while the study goes on."""

from __future__ import annotations

import json

import mlflow
import optuna
import pytest
import torch
import yaml
from subprocess_env import FOREIGN, run_amdim

from amdim import cli
from amdim.config import preset, with_overrides
from amdim.errors import DivergedError

# The recipe: a huge learning rate with both NCE stabilisers off diverges within steps.
DIVERGES = {"optim.lr": 1e8, "loss.tclip": None, "loss.reg_weight": 0.0}
SMALL = {
    "data.spec": "synthetic:n_train=256,n_test=64",
    "data.batch_size": 32,
    "model.ndf": 16,
    "model.n_rkhs": 128,
    "model.mlp_hidden": 32,
    "train.device": "cpu",
    "train.log_every": 1000,
    "probe.epochs": 2,
    "probe.lrs": "0.01",
    "probe.weight_decays": "0",
}


def test_the_trainer_stops_at_the_first_non_finite_loss():
    from amdim.trainer import fit

    cfg = with_overrides(preset("tiny"), {**SMALL, **DIVERGES, "train.epochs": 3})
    with pytest.raises(DivergedError) as err:
        fit(cfg, log=None)
    assert err.value.epoch == 1 and 1 <= err.value.step <= 8
    assert f"epoch 1, step {err.value.step}" in str(err.value)


def test_train_exits_3_in_one_line_and_leaves_no_result(tmp_path, monkeypatch, capsys):
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    out = tmp_path / "out"
    sets = [f"{k}={'off' if v is None else v}" for k, v in {**SMALL, **DIVERGES}.items()]
    flags = [x for s in sets for x in ("--set", s)]
    argv = ["train", "--local", "--preset", "tiny", "--epochs", "2", "--out", str(out)]
    # One good epoch first, then the same folder diverges: its epoch-1 checkpoint must not survive
    # as if it were the run's result.
    good = [
        x
        for s in sets
        if not s.startswith(("optim.lr", "loss.tclip", "loss.reg_weight"))
        for x in ("--set", s)
    ]
    assert cli.main([*argv[:-3], "1", "--out", str(out), "--no-probe", *good]) == 0
    assert (out / "checkpoint.pt").is_file()
    capsys.readouterr()
    rc = cli.main([*argv, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 3, err
    assert err.count("\n") == 0 and "training diverged: the loss is not finite at epoch 1, step" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("amdim").experiment_id])
    bad = [r for r in runs if r.data.tags.get("state") == "diverged"]
    assert (
        len(bad) == 1 and bad[0].info.status == "FAILED" and "probe_test_accuracy" not in bad[0].data.metrics
    )


DIVERGE_SPEC = {
    "name": "diverge",
    "base": {
        "preset": "tiny",
        "data": SMALL["data.spec"],
        "set": {
            **{k: v for k, v in SMALL.items() if k != "data.spec"},
            "data.online_val_fraction": 0.1,
            "loss.reg_weight": 0.0,
            "train.max_steps_per_epoch": 4,
        },
    },
    "search": {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e8, "log": True},
        "loss.tclip": {"type": "choice", "values": [20.0, "off"]},
    },
    "points": [
        {"label": "diverges", "optim.lr": 1e8, "loss.tclip": "off"},
        {"label": "trains", "optim.lr": 2e-4, "loss.tclip": 20.0},
    ],
    "budget": {"trials": 2, "epochs": 2, "max_concurrent": 2, "workers": 1, "cpus_per_worker": 0.75},
    "scheduler": {"type": "none"},
    "sampler": {"type": "tpe", "seed": 0},
}


def test_a_diverging_trial_fails_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    spec = tmp_path / "diverge.yaml"
    spec.write_text(yaml.safe_dump(DIVERGE_SPEC, allow_unicode=True))
    proc = run_amdim(runs, "study", "run", str(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "diverged (non-finite loss at epoch 1, step" in proc.stdout
    study = optuna.load_study(
        study_name="diverge", storage=f"sqlite:///{runs / 'studies' / 'diverge' / 'optuna.db'}"
    )
    by_lr = {t.params["optim.lr"]: t for t in study.trials}
    assert by_lr[1e8].state == optuna.trial.TrialState.FAIL and by_lr[1e8].user_attrs["state"] == "diverged"
    assert by_lr[2e-4].state == optuna.trial.TrialState.COMPLETE  # the study went on
    state = json.loads((runs / "studies" / "diverge" / "state.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("diverge")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    )
    by_setting = {r.data.tags["setting"]: r for r in children}
    bad = by_setting["diverges"]
    assert (bad.data.tags["state"], bad.info.status) == ("diverged", "FAILED")
    assert bad.data.tags["diverged_at"].startswith("epoch 1 step")
    assert "probe_val_accuracy" not in bad.data.metrics and "checkpoint_path" not in bad.data.tags
    assert by_setting["trains"].data.tags["state"] == "complete"
    # The report counts it.
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(runs))
    assert cli.main(["report", "diverge", "--format", "csv", "--out", str(tmp_path / "report")]) == 0
    import pandas as pd

    states = pd.read_csv(tmp_path / "report" / "states.csv").set_index("stage")
    assert states.loc["search", "diverged"] == 1 and states.loc["search", "complete"] == 1
    assert torch.isfinite(torch.tensor(by_lr[2e-4].value))
