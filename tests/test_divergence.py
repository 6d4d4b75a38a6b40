"""A run whose loss stops being finite stops at once and is never recorded as a result: the
trainer names the epoch and step, and `amdim train` exits 3 with one line and leaves no
checkpoint. (In a study: tests/test_study.py, whose resume study has a diverging third trial;
every rank of a DDP group stops at the same step: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import mlflow
import pytest
from subprocess_env import FOREIGN

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
