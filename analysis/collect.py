"""Read a study back from MLflow (and its Optuna database) into tidy pandas DataFrames.

``collect(name)`` returns ``(trials, curves)``:

* ``trials``: one row per trial and seed (search and confirm stages): study, stage, trial (Optuna
  number for the search, position for the confirm stage), run_id, state, seed, setting, dataset
  (:func:`amdim.config.dataset_name`: ``cifar10``, an npz file's or image folder's name, ...),
  config_id, epochs, wall_s, best/final online linear-probe test accuracy, best/final online MLP
  accuracy (the tables read the final, last-epoch ones: a best epoch chosen on the test images is
  biased upwards), best/final online accuracy on the validation split (``data.online_val_fraction``;
  NaN without it), the final offline probe accuracies (NaN when the trial did not finish), and
  ``param.<key>`` for every searched key, typed as the config types it (``None`` is "off").
* ``curves``: the online linear probe per epoch for every trial (early-stopped ones included), on
  the test set (``test_acc_lin``, the paper's online evaluation) and on the validation split
  (``val_acc_lin``, what ASHA decides on in the shipped specs; NaN without the split).

Only MLflow's records are read, so a study collected on a laptop from a cluster's tracking server
needs nothing else; the Optuna database adds the trial numbers and the parameter importances.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from amdim.config import dataset_name
from amdim.errors import UserError
from amdim.harness import tracking

CURVE_METRIC = "test_acc_lin"
VAL_CURVE_METRIC = "val_acc_lin"  # the online probe on data.online_val_fraction of the training set


def _typed(key: str, text: str | None) -> Any:
    from amdim.harness.study_spec import canonical

    if text is None:
        return None
    try:
        return canonical(key, text)
    except Exception:
        return text


def metric_by_epoch(client, run_id: str, key: str) -> dict[int, float]:
    """``{epoch: value}``; a resumed trial may have logged an epoch twice: the last value wins."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def _optuna_numbers(name: str) -> dict[str, int]:
    import optuna

    from amdim.harness.study import optuna_storage, study_dir

    if not (study_dir(name) / "optuna.db").is_file():
        return {}
    try:
        study = optuna.load_study(study_name=name, storage=optuna_storage(name))
    except KeyError:
        return {}
    return {t.user_attrs["tune_trial_id"]: t.number for t in study.trials if "tune_trial_id" in t.user_attrs}


def collect(name: str, uri: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's trials and learning curves (see the module docstring)."""
    from amdim.harness.study import load_study_spec, study_runs

    spec = load_study_spec(name)
    uri = uri or tracking.tracking_uri()
    client, parent, runs = study_runs(name, uri)
    if parent is None:
        raise UserError(f"study '{name}': its MLflow parent run is not in {uri}")
    numbers = _optuna_numbers(name)
    rows, curves = [], []
    confirm_index = 0
    for run in sorted(runs, key=lambda r: (r.data.tags.get("stage") != "search", r.info.start_time)):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        stage = tags.get("stage", "search")
        if stage == "search":
            trial = numbers.get(tags.get("tune_trial_id", ""), -1)
        else:
            trial, confirm_index = confirm_index, confirm_index + 1
        lin = metric_by_epoch(client, run.info.run_id, CURVE_METRIC)
        mlp = metric_by_epoch(client, run.info.run_id, "test_acc_mlp")
        val = metric_by_epoch(client, run.info.run_id, VAL_CURVE_METRIC)  # ASHA's signal, if the split exists
        keys = [k for k in tags.get("sampled_keys", ",".join(spec.keys)).split(",") if k]
        wall = metrics.get("trial_wall_s")
        if wall is None and run.info.end_time and run.info.start_time:
            wall = (run.info.end_time - run.info.start_time) / 1000
        row = {
            "study": name,
            "stage": stage,
            "trial": trial,
            "run_id": run.info.run_id,
            "state": tags.get("state", "running"),
            "seed": int(params.get("train.seed", 0)),
            "setting": tags.get("setting", ""),
            "dataset": dataset_name(params.get("data.spec", "")),
            "config_id": tags.get("config_id", ""),
            "epochs": int(max(lin)) if lin else 0,
            "wall_s": float(wall) if wall is not None else math.nan,
            "best_online_acc": max(lin.values()) if lin else math.nan,
            "final_online_acc": lin[max(lin)] if lin else math.nan,
            "best_online_mlp_acc": max(mlp.values()) if mlp else math.nan,
            "final_online_mlp_acc": mlp[max(mlp)] if mlp else math.nan,
            "best_online_val_acc": max(val.values()) if val else math.nan,
            "final_online_val_acc": val[max(val)] if val else math.nan,
            "probe_test_accuracy": metrics.get("probe_test_accuracy", math.nan),
            "probe_val_accuracy": metrics.get("probe_val_accuracy", math.nan),
            "images_per_s": metrics.get("images_per_s", math.nan),
            "epoch_time_s": sum_by_epoch(client, run.info.run_id, "epoch_time_s"),
        }
        for key in keys:
            row[f"param.{key}"] = _typed(key, params.get(key))
        rows.append(row)
        for epoch, value in sorted(lin.items()):
            curves.append(
                {"study": name, "stage": stage, "trial": trial, "run_id": run.info.run_id,
                 "state": row["state"], "epoch": epoch, CURVE_METRIC: value,
                 VAL_CURVE_METRIC: val.get(epoch, math.nan)}
            )  # fmt: skip
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values(["stage", "trial"], key=_stage_key, kind="stable").reset_index(drop=True)
    curve_cols = ["study", "stage", "trial", "run_id", "state", "epoch", CURVE_METRIC, VAL_CURVE_METRIC]
    return trials, pd.DataFrame(curves, columns=curve_cols)


def sum_by_epoch(client, run_id: str, key: str) -> float:
    """Sum over epochs of a per-epoch metric (NaN when never logged)."""
    values = metric_by_epoch(client, run_id, key)
    return float(sum(values.values())) if values else math.nan


def _stage_key(col: pd.Series) -> pd.Series:
    if col.name == "stage":
        return col.map({"search": 0, "confirm": 1}).fillna(2)
    return col


def importances(name: str, trials: pd.DataFrame, metric: str) -> tuple[dict[str, float], str]:
    """fANOVA importances from the Optuna study when it has enough complete trials, else the
    variance-share fallback of :func:`analysis.plots.importance_from_trials`; none (an empty dict)
    below two complete search trials, where no importance can be measured."""
    import optuna

    from amdim.harness.study import optuna_storage, study_dir
    from analysis.plots import importance_from_trials

    if (study_dir(name) / "optuna.db").is_file():
        try:
            study = optuna.load_study(study_name=name, storage=optuna_storage(name))
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) >= 3 and len(study.best_trial.params) >= 1:
                return dict(optuna.importance.get_param_importances(study)), "optuna fANOVA"
        except Exception:  # too few distinct values, a single parameter value, ...
            pass
    search = trials[trials["stage"] == "search"]
    if ((search["state"] == "complete") & search[metric].notna()).sum() < 2:
        return {}, "none (fewer than 2 complete search trials)"
    return importance_from_trials(search, metric), "variance share (fallback)"
