"""``amdim report``: a study's tables and plots for a paper, from its MLflow and Optuna records."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from amdim.errors import UserError
from analysis import plots, tables
from analysis.collect import collect, importances
from analysis.verdicts import verdict_table

FORMATS = ("csv", "md", "tex")


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format: unknown format '{(bad or [text])[0]}' (choose from {', '.join(FORMATS)})")
    return formats


def report(
    name: str, formats: list[str], out: Path, metric: str = "probe_test_accuracy", baseline: str | None = None
) -> dict:
    """Write the results, states, ablation and verdict tables and the plots for study ``name``
    into ``out``. The verdicts compare every labelled setting and confirm-stage configuration with
    ``baseline`` (default: the spec's first labelled point) on the study's rank metric and the
    test accuracy (:mod:`analysis.verdicts`)."""
    from amdim.harness.study import load_study_spec

    spec = load_study_spec(name)
    trials, curves = collect(name)
    if trials.empty:
        raise UserError(f"study '{name}' has no trial runs in MLflow yet")
    reference = baseline or (spec.point_labels[0] if spec.point_labels else None)
    named = {"results": tables.results_table(trials, metric), "states": tables.state_counts(trials)}
    if (trials["setting"].astype(str) != "").any():
        named["ablation"] = tables.ablation_table(trials)
    info: dict = {"trials": len(trials), "reference": reference}
    if reference is not None:
        metrics = list(dict.fromkeys([spec.rank_metric, "probe_test_accuracy"]))
        try:
            named["verdicts"] = verdict_table(trials, reference, metrics)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = tables.write_report_tables(named, formats, out)
    trials.to_csv(out / "trials.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    written += [out / "trials.csv", out / "curves.csv"]
    info["files"] = written
    imp, method = importances(name, trials, metric)
    if imp:
        written.append(
            plots.param_importance(imp, out / "importance.png", title=f"{name}: importance ({method})")
        )
    info["importance_method"] = method
    search = trials[trials["stage"] == "search"]
    if len(search):
        written.append(plots.parallel_coordinates(search, metric, out / "parallel.png"))
    if len(curves):
        written.append(plots.learning_curves(curves, out / "curves.png"))
        val = curves.dropna(subset=["val_acc_lin"])
        if len(val):  # the study's online validation split: what ASHA decided on
            written.append(plots.learning_curves(val, out / "curves_val.png", metric="val_acc_lin"))
    complete = trials[(trials["state"] == "complete") & trials[metric].notna()]
    if len(complete):
        info["online_offline_r"] = plots.online_vs_offline(trials, out / "online_vs_offline.png")
        written.append(out / "online_vs_offline.png")
    else:
        info["online_offline_r"] = math.nan
    return info


def compare(names: list[str], formats: list[str], out: Path, metric: str = "probe_test_accuracy") -> dict:
    frames = [collect(n)[0] for n in names]
    trials = pd.concat([f for f in frames if len(f)], ignore_index=True)
    if trials.empty:
        raise UserError(f"no trial runs in MLflow for {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    written = tables.write_report_tables({"compare": tables.compare_table(trials, metric)}, formats, out)
    return {"trials": len(trials), "files": written}
