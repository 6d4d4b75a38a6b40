"""Study plots render headless to real PNG files, the online/offline r matches numpy, and empty inputs fail."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_analysis_tables import make_trials

from analysis.plots import (
    importance_from_trials,
    learning_curves,
    online_vs_offline,
    parallel_coordinates,
    param_importance,
    pearson_r,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


def make_curves() -> pd.DataFrame:
    """Online probe curves for the fixture's runs: early-stopped runs stop at epoch 3."""
    trials = make_trials()
    rows = []
    for t in trials.itertuples():
        for epoch in range(1, t.epochs + 1):
            acc = 0.1 + (0.5 if math.isnan(t.best_online_acc) else t.best_online_acc - 0.1) * (1 - 0.7**epoch)
            rows.append(
                dict(
                    study=t.study,
                    stage=t.stage,
                    trial=t.trial,
                    run_id=t.run_id,
                    state=t.state,
                    epoch=epoch,
                    test_acc_lin=acc,
                )
            )
    return pd.DataFrame(rows)


def test_every_plot_renders_a_png(tmp_path):
    trials = make_trials()
    assert_png(
        param_importance(
            {"loss.reg_weight": 0.6, "loss.tclip": 0.3, "aug.jitter_p": 0.1}, tmp_path / "imp.png"
        )
    )
    assert_png(parallel_coordinates(trials, "probe_test_accuracy", tmp_path / "par.png"))
    assert_png(learning_curves(make_curves(), tmp_path / "sub" / "curves.png"))
    with_val = make_curves().assign(val_acc_lin=lambda d: d["test_acc_lin"] + 0.01)
    assert_png(learning_curves(with_val, tmp_path / "curves_val.png", metric="val_acc_lin"))
    with pytest.raises(ValueError, match="val_acc_lin"):  # a study without the split has no such curve
        learning_curves(make_curves(), tmp_path / "x.png", metric="val_acc_lin")
    r = online_vs_offline(trials, tmp_path / "scatter.png")
    assert_png(tmp_path / "scatter.png")
    assert -1.0 <= r <= 1.0


def test_online_vs_offline_r_matches_numpy(tmp_path):
    trials = make_trials()
    done = trials[(trials["state"] == "complete") & trials["probe_test_accuracy"].notna()]
    for online in ("best_online_acc", "final_online_acc"):
        expected = np.corrcoef(done["probe_test_accuracy"], done[online])[0, 1]
        assert online_vs_offline(trials, tmp_path / f"{online}.png", online=online) == pytest.approx(
            expected, abs=1e-12
        )


def test_online_vs_offline_nan_below_three_points(tmp_path):
    trials = make_trials()
    few = trials[trials["state"] == "complete"].head(2)
    assert math.isnan(online_vs_offline(few, tmp_path / "few.png"))
    assert_png(tmp_path / "few.png")
    assert math.isnan(pearson_r(np.ones(5), np.arange(5.0)))  # no spread: undefined, not a warning


def test_empty_inputs_raise(tmp_path):
    trials = make_trials()
    with pytest.raises(ValueError, match="no importances"):
        param_importance({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no complete or early-stopped"):
        parallel_coordinates(trials[trials["state"] == "failed"], "probe_test_accuracy", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no param"):
        parallel_coordinates(
            trials.drop(columns=[c for c in trials if c.startswith("param.")]),
            "probe_test_accuracy",
            tmp_path / "x.png",
        )
    with pytest.raises(ValueError, match="no curve points"):
        learning_curves(make_curves().iloc[:0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks column"):
        learning_curves(make_curves().drop(columns="epoch"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no trials"):
        online_vs_offline(trials.iloc[:0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least 2"):
        importance_from_trials(trials.iloc[:1])
    assert not (tmp_path / "x.png").exists()


def test_importance_fallback_is_the_variance_share():
    trials = make_trials().query("study == 'abl-syn'")
    raw = importance_from_trials(trials, normalize=False)
    done = trials[(trials["state"] == "complete") & trials["probe_test_accuracy"].notna()]
    y = done["probe_test_accuracy"].to_numpy()
    tclip = done["param.loss.tclip"].map(lambda v: "off" if pd.isna(v) else v)
    between = sum(len(g) * (g.mean() - y.mean()) ** 2 for _, g in pd.Series(y).groupby(tclip.to_numpy()))
    assert raw["loss.tclip"] == pytest.approx(between / ((y - y.mean()) ** 2).sum())
    assert all(0.0 <= v <= 1.0 for v in raw.values())
    normalised = importance_from_trials(trials)
    assert sum(normalised.values()) == pytest.approx(1.0)
    assert list(normalised.values()) == sorted(normalised.values(), reverse=True)
