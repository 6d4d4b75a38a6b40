"""Which per-epoch signal ranks a study's trials the way their final offline probe does.

    python -m analysis.signals NAME [NAME ...] [--target probe_val_accuracy] [--min-rho 0.7]

For the complete search trials of the named studies (pooled: one fixed epoch budget, no early
stopping, so every trial has every epoch), and for each signal and each epoch ``e`` before the
last, the Spearman rank correlation across trials between the signal's value at epoch ``e`` and
the trial's final ``--target`` (default: the offline probe's validation accuracy, what the studies
rank on; never the test set). ASHA with ``grace_period = e`` decides first at epoch ``e``, so the
first epoch at which a signal reaches ``--min-rho`` is the grace period it supports.

Signals (per-epoch MLflow metrics): the online linear and MLP probes on the online validation split
(``val_acc_lin``, ``val_acc_mlp``), weighted kNN on the same split (``val_acc_knn``), RankMe of its
features (``rankme``), and the NCE loss (``loss_nce``, lower is better, so ranked negated). The
NCE loss changes meaning with the NCE settings a study searches (regulariser, clip), which is one
reason it is measured rather than assumed. Prints a Markdown table and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pandas as pd

SIGNALS = {  # metric -> (label, sign: +1 if higher is better)
    "val_acc_lin": ("online linear (val split)", 1),
    "val_acc_mlp": ("online MLP (val split)", 1),
    "val_acc_knn": ("weighted kNN (val split)", 1),
    "rankme": ("RankMe (val split)", 1),
    "loss_nce": ("NCE loss (negated)", -1),
}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties share their mean rank)."""
    mask = ~(np.isnan(x) | np.isnan(y))
    x, y = x[mask], y[mask]
    if len(x) < 3:
        return math.nan
    rx = pd.Series(x).rank().to_numpy()
    ry = pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def signal_frame(names: list[str], target: str) -> tuple[pd.DataFrame, int]:
    """One row per (trial, epoch) with every signal, and each trial's final ``target``; and the
    epoch budget (the most epochs any trial trained)."""
    from amdim.harness.study import study_runs
    from analysis.collect import metric_by_epoch

    rows = []
    for name in names:
        client, _, runs = study_runs(name)
        for run in runs:
            tags = run.data.tags
            if (
                tags.get("stage") != "search"
                or tags.get("state") != "complete"
                or target not in run.data.metrics
            ):
                continue
            curves = {m: metric_by_epoch(client, run.info.run_id, m) for m in SIGNALS}
            for epoch in sorted(curves["val_acc_lin"]):
                rows.append({
                    "study": name, "run_id": run.info.run_id, "setting": tags.get("setting", ""),
                    "epoch": epoch, "target": run.data.metrics[target],
                    **{m: curves[m].get(epoch, math.nan) for m in SIGNALS},
                })  # fmt: skip
    frame = pd.DataFrame(rows)
    return frame, int(frame["epoch"].max()) if len(frame) else 0


def correlations(frame: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Spearman rho per signal (rows) and epoch (columns), across trials."""
    table = {}
    for metric, (_, sign) in SIGNALS.items():
        table[metric] = {
            e: spearman(sign * g[metric].to_numpy(float), g["target"].to_numpy(float))
            for e, g in frame.groupby("epoch")
        }
    return pd.DataFrame(table).T.reindex(columns=range(1, budget + 1))


def first_rung(row: pd.Series, min_rho: float, budget: int) -> int | None:
    """The first epoch before the last at which the signal's rho reaches ``min_rho``."""
    for epoch in range(1, budget):
        if row.get(epoch, math.nan) >= min_rho:
            return epoch
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.signals", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--target", default="probe_val_accuracy")
    p.add_argument("--min-rho", type=float, default=0.7)
    args = p.parse_args(argv)
    frame, budget = signal_frame(args.names, args.target)
    n = frame["run_id"].nunique() if len(frame) else 0
    if n < 3:
        print(f"error: {n} complete search trials with {args.target}; need at least 3", file=sys.stderr)
        return 2
    rho = correlations(frame, budget)
    rungs = {m: first_rung(rho.loc[m], args.min_rho, budget) for m in rho.index}
    # The best signal: the one that reaches min_rho earliest; ties (and none reaching it) go to the
    # higher mean rho over the candidate rungs (every epoch before the last).
    mean_rho = rho.loc[:, [e for e in rho.columns if e < budget]].mean(axis=1)
    best = min(rho.index, key=lambda m: (rungs[m] is None, rungs[m] or budget, -mean_rho[m]))
    header = (
        "| signal | "
        + " | ".join(f"epoch {e}" for e in rho.columns)
        + " | first epoch with rho >= "
        + f"{args.min_rho:g} |"
    )
    lines = [header, "|---|" + "---:|" * len(rho.columns) + "---:|"]
    for m in rho.index:
        cells = " | ".join("" if math.isnan(v) else f"{v:+.2f}" for v in rho.loc[m])
        lines.append(f"| {SIGNALS[m][0]} (`{m}`) | {cells} | {rungs[m] or 'none'} |")
    print("\n".join(lines))
    summary = {
        "studies": args.names, "target": args.target, "trials": n, "epochs": budget,
        "min_rho": args.min_rho, "rho": {m: {int(e): (None if math.isnan(v) else round(v, 3)) for e, v in rho.loc[m].items()} for m in rho.index},
        "first_rung": rungs, "mean_rho_before_last": {m: round(float(v), 3) for m, v in mean_rho.items()},
        "best": best, "grace_period": rungs[best],
        "target_spread": {"min": float(frame.groupby("run_id")["target"].first().min()),
                          "max": float(frame.groupby("run_id")["target"].first().max())},
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
