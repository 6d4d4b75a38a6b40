"""Which rows of an ablation are real: each setting against a reference setting, over seeds.

For every labelled setting of a study and every confirm-stage configuration without a label,
:func:`verdict_table` compares its complete runs with the reference setting's (the spec's first
labelled point, or the one the user names), on each metric asked for (the study's rank metric and
the test accuracy):

* ``diff``: mean(setting) - mean(reference), with the 95 % confidence interval of Welch's t
  (unequal variances; ``scipy.stats.ttest_ind(equal_var=False)`` and its
  ``confidence_interval``), in accuracy fractions;
* ``p``: Welch's two-sided p-value, and ``p_holm``: the same adjusted by Holm's step-down method
  for the number of settings compared on that metric (so that one of ten comparisons coming out
  "significant" by chance is not reported as an effect);
* ``verdict``: ``better`` / ``worse`` when ``p_holm < 0.05`` (by the sign of ``diff``), else ``no
  detectable difference``; ``one seed: no verdict`` when either side has fewer than 2 complete
  runs (no variance, no test), and ``no spread over seeds: no verdict`` when both sides' runs
  are all alike (Welch's t is undefined);
* ``seeds_for_80pct_power``: the seeds per side with which a two-sided Welch test at 5 % would
  detect a true difference of the observed size with 80 % probability (equal seeds per side, the
  two sides' sample variances averaged; the noncentral t distribution, ``scipy.stats.nct``). It
  says how far a "no detectable difference" is from a verdict; a setting whose observed
  difference is 0 gets no figure. It uses the unadjusted 5 % level.

Runs are a setting's confirm-stage runs where it has any, else its search-stage runs (as in the
other tables), so the search seed is never counted twice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.tables import PARAM_PREFIX, _config_text, _mark, _preferred_stage, param_columns

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000
NO_VERDICT = "one seed: no verdict"
LABELS = {
    "n": "seeds", "n_reference": "reference seeds", "reference_mean": "reference", "diff": "difference",
    "ci_low": "95 % CI low", "ci_high": "95 % CI high", "p_holm": "p (Holm)",
    "seeds_for_80pct_power": "seeds for 80 % power",
}  # fmt: skip
METRIC_LABELS = {
    "probe_test_accuracy": "test accuracy (offline probe)",
    "probe_val_accuracy": "validation accuracy (offline probe)",
}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaNs stay NaN and do not count)."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b), its Welch confidence interval and two-sided p-value (scipy.stats)."""
    with warnings.catch_warnings():  # runs all alike: scipy warns, and the p-value is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
        ci = result.confidence_interval(confidence)
    return {
        "diff": float(np.mean(a) - np.mean(b)),
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "p": float(result.pvalue),
        "df": float(result.df),
    }


def welch_power(diff: float, sd_a: float, sd_b: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided Welch test with ``n`` runs per side against a true difference ``diff``."""
    se = math.sqrt((sd_a**2 + sd_b**2) / n)
    if se == 0:
        return 1.0 if diff != 0 else alpha
    va, vb = sd_a**2 / n, sd_b**2 / n
    df = (va + vb) ** 2 / (va**2 / (n - 1) + vb**2 / (n - 1))
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(diff) / se
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_for_power(
    diff: float, sd_a: float, sd_b: float, power: float = POWER, alpha: float = ALPHA
) -> float:
    """The fewest runs per side (>= 2) reaching ``power``; NaN when ``diff`` is 0 or a standard
    deviation is unknown, inf past :data:`MAX_SEEDS`."""
    if diff == 0 or any(math.isnan(x) for x in (diff, sd_a, sd_b)):
        return math.nan
    if welch_power(diff, sd_a, sd_b, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4
    while welch_power(diff, sd_a, sd_b, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return math.inf
    while hi - lo > 1:  # power grows with n: the first n reaching it, by bisection
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if welch_power(diff, sd_a, sd_b, mid, alpha) < power else (lo, mid)
    return hi


def comparison_groups(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Name -> complete runs: every labelled setting, then every confirm-stage configuration
    without a label (named by its sampled values)."""
    has_label = trials["setting"].map(lambda s: isinstance(s, str) and bool(s))
    done = trials[trials["state"] == "complete"]
    labelled = done[has_label[done.index]]
    groups: dict[str, pd.DataFrame] = {}
    for setting in dict.fromkeys(trials.loc[has_label, "setting"]):
        groups[setting] = _preferred_stage(labelled[labelled["setting"] == setting])
    keys = [c.removeprefix(PARAM_PREFIX) for c in param_columns(trials)]
    confirm = done[(done["stage"] == "confirm") & ~done.index.isin(labelled.index)]
    for config_id, rows in confirm.groupby("config_id", sort=False):
        shown = rows.rename(columns=lambda c: c.removeprefix(PARAM_PREFIX)).iloc[0]
        groups[f"config {config_id}: {_config_text(shown, keys)}"] = rows
    return groups


def verdict_table(
    trials: pd.DataFrame, reference: str, metrics: Sequence[str] = ("probe_test_accuracy",)
) -> pd.DataFrame:
    """Every comparison group against ``reference`` on each of ``metrics`` (see the module
    docstring). Raises ValueError when ``reference`` is not a labelled setting of ``trials``."""
    groups = comparison_groups(trials)
    if reference not in groups:
        labels = [g for g in groups if not g.startswith("config ")]
        raise ValueError(
            f"--baseline '{reference}' is not a labelled setting (choose from {', '.join(labels)})"
        )
    ref = groups[reference]
    records = []
    for metric in metrics:
        rows = []
        b = ref[metric].dropna().to_numpy(float)
        for name, group in groups.items():
            if name == reference:
                continue
            a = group[metric].dropna().to_numpy(float)
            row = {
                "setting": name, "metric": METRIC_LABELS.get(metric, metric), "n": len(a), "n_reference": len(b),
                "mean": float(np.mean(a)) if len(a) else math.nan,
                "reference_mean": float(np.mean(b)) if len(b) else math.nan,
                "diff": float(np.mean(a) - np.mean(b)) if len(a) and len(b) else math.nan,
                "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "p_holm": math.nan,
                "verdict": NO_VERDICT, "seeds_for_80pct_power": math.nan,
            }  # fmt: skip
            if len(a) >= 2 and len(b) >= 2:
                row.update({k: v for k, v in welch(a, b).items() if k != "df"})
                row["seeds_for_80pct_power"] = seeds_for_power(
                    row["diff"], float(np.std(a, ddof=1)), float(np.std(b, ddof=1))
                )
            rows.append(row)
        for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
            row["p_holm"] = adjusted
            if row["n"] >= 2 and row["n_reference"] >= 2 and math.isnan(adjusted):
                row["verdict"] = "no spread over seeds: no verdict"  # identical values on both sides
            elif not math.isnan(adjusted):
                significant = adjusted < ALPHA
                row["verdict"] = (
                    ("better" if row["diff"] > 0 else "worse") if significant else "no detectable difference"
                )
        records += rows
    columns = ["setting", "metric", "n", "n_reference", "mean", "reference_mean", "diff", "ci_low", "ci_high",
               "p", "p_holm", "verdict", "seeds_for_80pct_power"]  # fmt: skip
    table = pd.DataFrame.from_records(records, columns=columns)
    return _mark(
        table,
        percent=["mean", "reference_mean", "diff", "ci_low", "ci_high"],
        pairs={},
        labels=LABELS,
        caption=(
            f"Each setting against '{reference}': difference of means over seeds (percentage points) with "
            "Welch's 95 % confidence interval, p-values Holm-adjusted per metric, and the seeds per side "
            "that would detect the observed difference with 80 % power"
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m analysis.verdicts TRIALS_CSV [--baseline LABEL] [--metric M ...]``: the verdict
    table of a report's ``trials.csv`` (``amdim report`` writes it), as Markdown."""
    import argparse

    from analysis.tables import to_markdown

    p = argparse.ArgumentParser(prog="python -m analysis.verdicts", description=main.__doc__.splitlines()[0])
    p.add_argument("trials", help="a report's trials.csv")
    p.add_argument(
        "--baseline", default="paper default", help="the reference setting (default: paper default)"
    )
    p.add_argument(
        "--metric", action="append", dest="metrics",
        help="a trials.csv accuracy column (repeatable; default probe_val_accuracy and probe_test_accuracy)",
    )  # fmt: skip
    args = p.parse_args(argv)
    trials = pd.read_csv(
        args.trials, dtype={"config_id": str, "setting": str}, keep_default_na=False, na_values=[""]
    )
    trials["setting"] = trials["setting"].fillna("")
    print(
        to_markdown(
            verdict_table(
                trials, args.baseline, args.metrics or ["probe_val_accuracy", "probe_test_accuracy"]
            )
        )
    )


if __name__ == "__main__":
    main()
