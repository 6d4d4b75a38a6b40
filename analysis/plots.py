"""Study plots as PNG files: parameter importance, parallel coordinates, learning curves, and online vs
offline probe agreement; plus a fallback parameter importance computed without Optuna.

Every figure is drawn on its own Agg canvas (``FigureCanvasAgg``) and pyplot is never imported, so
the module needs no display and leaves matplotlib's global backend alone. Inputs follow the
``trials`` / ``curves`` schemas of :mod:`analysis.tables`; accuracies are fractions, plotted in
percent. Empty inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.tables import (
    PARAM_PREFIX,
    _missing,
    _require,
    format_param,
    format_value,
    param_columns,
    param_display,
)

STATE_STYLE: dict[str, dict[str, Any]] = {
    "complete": {"color": "tab:blue", "linestyle": "-", "linewidth": 1.2, "alpha": 0.8},
    "early_stopped": {"color": "0.55", "linestyle": "--", "linewidth": 1.0, "alpha": 0.9},
    "failed": {"color": "tab:red", "linestyle": ":", "linewidth": 1.0, "alpha": 0.9},
    "running": {"color": "tab:green", "linestyle": "-.", "linewidth": 1.0, "alpha": 0.9},
}
_OTHER_STYLE = {"color": "tab:purple", "linestyle": "-.", "linewidth": 1.0, "alpha": 0.9}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _axis(key: str, values: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Positions in [0, 1] for one parameter axis, and its tick labels.

    All-numeric axes are min-max scaled (log10 when positive and spanning two decades or more);
    anything else (strings, or numbers mixed with ``None``) is categorical, evenly spaced.
    """
    items = list(values)
    if all(_is_number(v) and not _missing(v) for v in items):
        raw = np.asarray(items, dtype=float)
        lo, hi = float(raw.min()), float(raw.max())
        log = lo > 0 and hi / lo >= 100
        x = np.log10(raw) if log else raw
        span = float(x.max() - x.min())
        if span == 0:
            return np.full(len(x), 0.5), [(0.5, format_param(key, lo))]
        return (x - x.min()) / span, [(0.0, format_param(key, lo)), (1.0, format_param(key, hi))]
    labels = [format_param(key, v) for v in items]
    order = {}
    for v, label in zip(items, labels):
        order.setdefault(label, (0, float(v), "") if _is_number(v) and not _missing(v) else (1, 0.0, label))
    categories = sorted(order, key=order.__getitem__)
    step = 1.0 / (len(categories) - 1) if len(categories) > 1 else 0.0
    where = {c: (i * step if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
    return np.array([where[label] for label in labels]), [(where[c], c) for c in categories]


def param_importance(importances: Mapping[str, float], path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of parameter importance, most important on top (Optuna's or the fallback's)."""
    if not importances:
        raise ValueError("param_importance: no importances to plot")
    items = sorted(importances.items(), key=lambda kv: (-kv[1], kv[0]))
    names = [str(k).removeprefix(PARAM_PREFIX) for k, _ in items]
    values = [float(v) for _, v in items]
    fig = _figure(6.0, 1.0 + 0.4 * len(items))
    ax = fig.add_subplot()
    ax.barh(range(len(items)), values, color="tab:blue")
    ax.set_yticks(range(len(items)), names)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(max(values), 1e-12) * 1.2)
    ax.set_xlabel("importance")
    ax.set_title(title or "Parameter importance")
    return _save(fig, path)


def parallel_coordinates(trials: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """One line per complete or early-stopped run across normalised parameter axes and ``metric``.

    Complete runs are coloured by ``metric`` (best drawn on top); early-stopped runs are grey and
    dashed, ending at the last parameter axis when they have no ``metric``. Failed and running
    trials are left out.
    """
    _require(trials, ["state", metric], "parallel_coordinates")
    params = param_columns(trials)
    if not params:
        raise ValueError("parallel_coordinates: the frame has no param.* columns")
    keep = trials["state"].isin(["complete", "early_stopped"]).to_numpy(bool)
    rows = trials[keep].reset_index(drop=True)
    if rows.empty:
        raise ValueError("parallel_coordinates: no complete or early-stopped trials to plot")
    axes = [_axis(c, param_display(trials, c)[keep]) for c in params]
    score = rows[metric].to_numpy(float)
    finite = score[~np.isnan(score)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    span = hi - lo
    metric_y = (score - lo) / span if span > 0 else np.where(np.isnan(score), np.nan, 0.5)
    ys = np.column_stack([*(a[0] for a in axes), metric_y])
    xs = np.arange(ys.shape[1])
    norm = Normalize(100 * lo, 100 * hi if span > 0 else 100 * lo + 1e-9)
    cmap = colormaps["viridis"]

    fig = _figure(max(6.0, 1.6 * len(xs)), 4.5)
    ax = fig.add_subplot()
    coloured = (rows["state"] == "complete").to_numpy() & ~np.isnan(score)
    for i in np.flatnonzero(~coloured):
        ax.plot(xs, ys[i], **{**STATE_STYLE["early_stopped"], "zorder": 1})
    for i in sorted(np.flatnonzero(coloured), key=lambda i: score[i]):
        ax.plot(xs, ys[i], color=cmap(norm(100 * score[i])), linewidth=1.5, alpha=0.9, zorder=2)
    ticks = [*(a[1] for a in axes), [(0.0, f"{100 * lo:.1f}"), (1.0, f"{100 * hi:.1f}")]]
    for x, axis_ticks in zip(xs, ticks):
        ax.axvline(x, color="black", linewidth=0.8, zorder=0)
        for y, label in axis_ticks:
            ax.text(x + 0.03, y, label, fontsize=7, va="center", ha="left")
    ax.set_xticks(
        xs, [c.removeprefix(PARAM_PREFIX) for c in params] + [f"{metric} (%)"], rotation=20, ha="right"
    )
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, xs[-1] + 0.5)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"{metric} (%)")
    if (~coloured).any():
        ax.legend(
            [Line2D([], [], **STATE_STYLE["early_stopped"])],
            ["early stopped / no metric"],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),
            frameon=False,
            fontsize=8,
        )
    ax.set_title(f"Parallel coordinates ({len(rows)} runs)")
    return _save(fig, path)


def learning_curves(curves: pd.DataFrame, path: str | Path, metric: str = "test_acc_lin") -> Path:
    """Every run's online linear-probe accuracy per epoch (``metric``: ``test_acc_lin``, or
    ``val_acc_lin``, the validation split ASHA reads), styled by state, with a legend of states.

    Early-stopped runs are grey dashed lines ending in a cross, drawn above the complete ones so
    they stay visible.
    """
    _require(curves, ["study", "stage", "trial", "run_id", "state", "epoch", metric], "learning_curves")
    if curves.empty:
        raise ValueError("learning_curves: no curve points to plot")
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    drawn: dict[str, int] = {}
    z = {"complete": 2, "running": 3, "failed": 4, "early_stopped": 5}
    groups = curves.groupby(["study", "stage", "trial", "run_id"], sort=True)
    for _, run in sorted(groups, key=lambda g: z.get(g[1]["state"].iloc[-1], 1)):
        run = run.sort_values("epoch")
        state = str(run["state"].iloc[-1])
        style = STATE_STYLE.get(state, _OTHER_STYLE)
        x, y = run["epoch"].to_numpy(), 100 * run[metric].to_numpy(float)
        ax.plot(x, y, **style, zorder=z.get(state, 1))
        if state == "early_stopped":
            ax.plot(x[-1:], y[-1:], marker="x", color=style["color"], markersize=7, zorder=z[state])
        drawn[state] = drawn.get(state, 0) + 1
    order = sorted(drawn, key=lambda s: (z.get(s, 9), s))
    handles = [
        Line2D([], [], **STATE_STYLE.get(s, _OTHER_STYLE), marker="x" if s == "early_stopped" else None)
        for s in order
    ]
    ax.legend(handles, [f"{s.replace('_', ' ')} ({drawn[s]})" for s in order], title="state", fontsize=8)
    ax.set_xlabel("epoch")
    split = "validation-split" if metric.startswith("val_") else "test"
    ax.set_ylabel(f"online linear probe {split} accuracy (%)")
    ax.set_title(f"Learning curves ({sum(drawn.values())} runs, {metric})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length samples; NaN with fewer than 3 points or no spread."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denom if denom > 0 else math.nan


def online_vs_offline(trials: pd.DataFrame, path: str | Path, online: str = "best_online_acc") -> float:
    """Scatter best and final online probe accuracy against the offline linear probe; returns r.

    Uses complete runs with an offline ``probe_test_accuracy``. ``r`` is the Pearson correlation of
    the ``online`` column with the offline probe (NaN with fewer than 3 points), shown in the title
    with the other online column's r.
    """
    columns = ["best_online_acc", "final_online_acc"]
    if online not in columns:
        raise ValueError(f"online_vs_offline: online must be one of {columns}, got {online!r}")
    _require(trials, ["state", "probe_test_accuracy", *columns], "online_vs_offline")
    if trials.empty:
        raise ValueError("online_vs_offline: no trials to plot")
    done = trials[(trials["state"] == "complete") & trials["probe_test_accuracy"].notna()]
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    rs = {}
    for col, marker, face in (("best_online_acc", "o", "tab:blue"), ("final_online_acc", "s", "none")):
        pts = done[done[col].notna()]
        x, y = 100 * pts["probe_test_accuracy"].to_numpy(float), 100 * pts[col].to_numpy(float)
        rs[col] = (pearson_r(x, y), len(pts))
        label = f"{col.split('_')[0]} online"
        ax.scatter(x, y, marker=marker, facecolors=face, edgecolors="tab:blue", label=label, s=28)
    lims = ax.get_xlim()
    ax.plot(lims, lims, color="0.6", linestyle="--", linewidth=0.8, label="y = x")
    r, n = rs[online]
    text = ", ".join(
        f"r {c.split('_')[0]} = {v:.3f}" if not math.isnan(v) else f"r {c.split('_')[0]} = n/a"
        for c, (v, _) in rs.items()
    )
    ax.set_title(f"Online vs offline linear probe (n = {n}): {text}", fontsize=9)
    ax.set_xlabel("offline linear probe test accuracy (%)")
    ax.set_ylabel("online linear probe test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return r


def importance_from_trials(
    trials: pd.DataFrame, metric: str = "probe_test_accuracy", n_bins: int = 4, normalize: bool = True
) -> dict[str, float]:
    """Fallback parameter importance without Optuna: the share of variance each parameter explains.

    For each ``param.*`` column, complete runs with a ``metric`` are grouped by the parameter's
    value (numeric parameters with more than ``n_bins`` distinct values go into ``n_bins`` quantile
    bins; ``None`` is its own group) and the importance is the correlation ratio
    eta^2 = between-group sum of squares / total sum of squares. It is marginal (one parameter at a
    time, no interactions) and biased upward when groups hold few runs, so prefer Optuna's fANOVA
    importance when the Optuna study is at hand. With ``normalize`` the values sum to 1, as
    Optuna's do. Keys are flat parameter names (no ``param.`` prefix), most important first.
    """
    _require(trials, ["state", metric], "importance_from_trials")
    params = param_columns(trials)
    if not params:
        raise ValueError("importance_from_trials: the frame has no param.* columns")
    keep = ((trials["state"] == "complete") & trials[metric].notna()).to_numpy(bool)
    done = trials[keep].reset_index(drop=True)
    if len(done) < 2:
        raise ValueError(
            f"importance_from_trials: needs at least 2 complete trials with {metric}, got {len(done)}"
        )
    y = done[metric].to_numpy(float)
    total = float(((y - y.mean()) ** 2).sum())
    scores = {}
    for col in params:
        values = param_display(trials, col)[keep].reset_index(drop=True)
        keys = values.map(format_value).astype(object)
        numeric = values.map(lambda v: _is_number(v) and not _missing(v)).to_numpy(bool)
        if numeric.any() and values[numeric].nunique() > n_bins:
            bins = pd.qcut(values[numeric].astype(float), n_bins, labels=False, duplicates="drop")
            keys[numeric] = [f"bin {int(b)}" for b in bins]
        between = sum(len(g) * (g.mean() - y.mean()) ** 2 for _, g in pd.Series(y).groupby(keys.to_numpy()))
        scores[col.removeprefix(PARAM_PREFIX)] = float(between) / total if total > 0 else 0.0
    if normalize and sum(scores.values()) > 0:
        s = sum(scores.values())
        scores = {k: v / s for k, v in scores.items()}
    return dict(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))
