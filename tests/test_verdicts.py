"""The report's verdicts (analysis.verdicts) on constructed trials whose answers are known,
checked against scipy.stats directly."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.tables import to_csv, to_latex, to_markdown
from analysis.verdicts import NO_VERDICT, holm, seeds_for_power, verdict_table, welch_power

REF = [0.600, 0.606, 0.596, 0.603, 0.599]
BETTER = [0.651, 0.648, 0.655, 0.650, 0.646]  # +5 points, tight: real
SAME = [0.602, 0.597, 0.605, 0.600, 0.601]  # the reference's spread around the same mean
NOISY = [0.610, 0.570, 0.640, 0.590]  # +1 point, wide: not detectable with 4 seeds
CONFIRMED = [0.630, 0.622, 0.628]  # a confirm-stage configuration without a label


def trials() -> pd.DataFrame:
    rows = []

    def add(setting, stage, values, config_id, state="complete", test_offset=0.0, lr=2e-4):
        for seed, v in enumerate(values):
            rows.append({
                "study": "s", "stage": stage, "trial": len(rows), "seed": seed, "state": state,
                "setting": setting, "config_id": config_id, "dataset": "npz",
                "probe_val_accuracy": v, "probe_test_accuracy": v + test_offset, "param.optim.lr": lr,
            })  # fmt: skip

    add("paper", "search", [0.5], "c0")  # a search seed: superseded by the confirm stage's runs
    add("paper", "confirm", REF, "c0")
    add("better", "confirm", BETTER, "c1", lr=5e-4)
    add("same", "confirm", SAME, "c2", test_offset=0.001, lr=1e-4)
    add("noisy", "confirm", NOISY, "c3", lr=3e-4)
    add("single", "search", [0.7], "c4", lr=6e-4)
    add("single", "search", [0.1], "c4", state="failed", lr=6e-4)  # failed runs never count
    add("", "confirm", CONFIRMED, "c5", lr=8e-4)
    add("", "search", [0.61], "c6", lr=9e-4)  # an unlabelled search trial: not compared
    return pd.DataFrame(rows)


def test_holm_matches_the_step_down_rule_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, math.nan, 0.01]) == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)
    assert holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])  # the larger keeps its own value
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1, and monotone
    assert holm([0.6, 0.7, 0.9]) == [1.0, 1.0, 1.0]


def test_each_setting_against_the_reference_as_scipy_computes_it():
    table = verdict_table(trials(), "paper", ["probe_val_accuracy", "probe_test_accuracy"])
    val = table[table["metric"].str.startswith("validation")].set_index("setting")
    assert list(val.index) == ["better", "same", "noisy", "single", "config c5: optim.lr=0.0008"]
    assert (val["n_reference"] == len(REF)).all()  # the confirm runs, not the search seed too
    p_values = {}
    for name, values in (
        ("better", BETTER),
        ("same", SAME),
        ("noisy", NOISY),
        ("config c5: optim.lr=0.0008", CONFIRMED),
    ):
        row = val.loc[name]
        result = stats.ttest_ind(values, REF, equal_var=False)
        ci = result.confidence_interval(0.95)
        assert row["n"] == len(values) and row["mean"] == pytest.approx(np.mean(values))
        assert row["diff"] == pytest.approx(np.mean(values) - np.mean(REF))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))
        assert row["p"] == pytest.approx(result.pvalue)
        p_values[name] = result.pvalue
    # Holm over the four settings compared on this metric (the one-seed setting has no test)
    names = list(p_values)
    for name, adjusted in zip(names, holm([p_values[n] for n in names])):
        assert val.loc[name, "p_holm"] == pytest.approx(adjusted)
    assert (
        val.loc["better", "verdict"] == "better"
        and val.loc["config c5: optim.lr=0.0008", "verdict"] == "better"
    )
    assert val.loc["same", "verdict"] == "no detectable difference"
    assert val.loc["noisy", "verdict"] == "no detectable difference"
    assert val.loc["single", "verdict"] == NO_VERDICT and val.loc["single", "n"] == 1
    assert math.isnan(val.loc["single", "p"]) and val.loc["single", "mean"] == pytest.approx(0.7)
    # the test accuracy is compared too, on its own numbers
    test = table[table["metric"].str.startswith("test")].set_index("setting")
    assert test.loc["same", "diff"] == pytest.approx(np.mean(SAME) + 0.001 - np.mean(REF))


def test_a_worse_setting_and_the_baseline_option():
    table = verdict_table(trials(), "better", ["probe_val_accuracy"]).set_index("setting")
    assert table.loc["paper", "verdict"] == "worse" and table.loc["paper", "diff"] < 0
    with pytest.raises(ValueError, match="'nope' is not a labelled setting"):
        verdict_table(trials(), "nope")


def test_identical_runs_on_both_sides_get_no_verdict_not_a_false_one():
    t = trials()
    t.loc[t["setting"] == "same", "probe_val_accuracy"] = 0.6
    t.loc[(t["setting"] == "paper") & (t["stage"] == "confirm"), "probe_val_accuracy"] = 0.6
    row = verdict_table(t, "paper", ["probe_val_accuracy"]).set_index("setting").loc["same"]
    assert row["verdict"] == "no spread over seeds: no verdict"


def test_seeds_for_80_percent_power_is_the_first_count_that_reaches_it():
    diff, sd_a, sd_b = 0.01, 0.029, 0.004  # the noisy setting's size of effect
    n = seeds_for_power(diff, sd_a, sd_b)
    assert n > 4 and welch_power(diff, sd_a, sd_b, n) >= 0.8 > welch_power(diff, sd_a, sd_b, n - 1)
    assert seeds_for_power(0.05, 0.003, 0.004) == 2  # a large, tight effect: two seeds do
    assert math.isnan(seeds_for_power(0.0, 0.01, 0.01))


def test_the_power_figure_holds_in_simulated_experiments():
    """Welch tests on simulated normal runs detect the difference about 80 % of the time at the
    computed seed count, and less often with one seed fewer."""
    diff, sd_a, sd_b = 0.01, 0.012, 0.008
    n = seeds_for_power(diff, sd_a, sd_b)
    rng = np.random.default_rng(0)

    def detected(k: int) -> float:
        a = rng.normal(diff, sd_a, (4000, k))
        b = rng.normal(0.0, sd_b, (4000, k))
        return float((stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05).mean())

    assert detected(n) > 0.77 and detected(n - 1) < 0.83


def test_the_verdicts_table_writes_in_every_format(tmp_path):
    table = verdict_table(trials(), "paper", ["probe_val_accuracy"])
    assert "better" in to_csv(table, tmp_path / "v.csv").read_text()
    md = to_markdown(table)
    assert "95 % CI low" in md and "seeds for 80 % power" in md and "one seed: no verdict" in md
    assert "p (Holm)" in to_latex(table, caption=table.attrs["caption"], label="tab:verdicts")
