"""analysis.signals: Spearman's rho per signal and epoch against the final probe, and the grace
period each signal supports, on frames whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from analysis.signals import SIGNALS, correlations, first_rung, spearman


def test_spearman_matches_scipy_with_ties_and_nans():
    g = np.random.default_rng(0)
    for _ in range(20):
        x, y = g.integers(0, 5, 12).astype(float), g.normal(size=12)
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    x = np.array([1.0, 2.0, math.nan, 4.0, 5.0])
    y = np.array([2.0, 4.0, 1.0, 8.0, 10.0])
    assert spearman(x, y) == pytest.approx(1.0)  # the NaN pair is left out
    assert math.isnan(spearman(np.array([1.0, 2.0]), np.array([1.0, 2.0])))  # too few trials
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))  # a constant signal ranks nothing


def _frame() -> pd.DataFrame:
    """Six trials, four epochs. The final target is the trial index. val_acc_lin only agrees from
    epoch 3 on; val_acc_knn agrees from epoch 1; loss_nce falls with the target (so, negated, it
    agrees); rankme is reversed."""
    rows = []
    for t in range(6):
        for e in range(1, 5):
            rows.append({
                "run_id": f"r{t}", "epoch": e, "target": float(t),
                "val_acc_lin": float(t) if e >= 3 else float(5 - t),
                "val_acc_mlp": math.nan, "val_acc_knn": float(t) + 0.1 * e,
                "rankme": -float(t), "loss_nce": 10.0 - t,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_correlations_and_the_grace_period_each_signal_supports():
    rho = correlations(_frame(), budget=4)
    assert list(rho.columns) == [1, 2, 3, 4] and set(rho.index) == set(SIGNALS)
    assert rho.loc["val_acc_knn"].tolist() == pytest.approx([1.0] * 4)
    assert rho.loc["loss_nce"].tolist() == pytest.approx([1.0] * 4)  # lower loss is better: negated
    assert rho.loc["rankme"].tolist() == pytest.approx([-1.0] * 4)
    assert rho.loc["val_acc_lin", 3] == pytest.approx(1.0) and rho.loc["val_acc_lin", 1] < 0.7
    assert rho.loc["val_acc_mlp"].isna().all()
    assert first_rung(rho.loc["val_acc_knn"], 0.7, 4) == 1
    assert first_rung(rho.loc["val_acc_lin"], 0.7, 4) == 3
    assert first_rung(rho.loc["rankme"], 0.7, 4) is None
    assert first_rung(rho.loc["val_acc_lin"], 0.7, 3) is None  # a rung on the last epoch does not count
