"""Report tables from a study's tidy ``trials`` frame, and their CSV, Markdown and LaTeX writers.

Input (from ``analysis.collect``): one row per trial and seed with ``study``, ``stage`` ('search' or
'confirm'), ``trial``, ``run_id``, ``state``, ``seed``, ``setting``, ``dataset``, ``config_id``,
the accuracy columns (fractions in [0, 1]) and one ``param.<flat key>`` column per sampled
parameter (the flat keys of ``amdim.config.to_flat``).

Tables are plain DataFrames; accuracies stay fractions. ``df.attrs`` tells the writers how to
show them: ``percent`` (columns shown in percent with one decimal), ``pairs`` (``{mean: std}``,
shown as one "55.0 ± 1.2" cell), ``labels`` (display headers) and ``caption``. CSV keeps the raw
numbers for machines; Markdown (pandas' ``to_markdown`` through tabulate) and LaTeX (pandas'
``Styler.to_latex``, booktabs rules) are for people.

Statistics: a configuration's numbers come from its confirm-stage runs when it has any, else from
its search-stage runs, so the search seed is never counted twice. ``std`` is the sample standard
deviation (ddof 1) over those runs, and is left empty for a single run.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.paper import PAPER_ABLATION

PARAM_PREFIX = "param."
STATES = ("complete", "early_stopped", "diverged", "failed", "running")
STAGES = ("search", "confirm")
PROBES: dict[str, tuple[str, str]] = {
    "offline_linear": ("probe_test_accuracy", "offline linear"),
    "online_linear": ("final_online_acc", "online linear"),
    "online_mlp": ("final_online_mlp_acc", "online MLP"),
}
"""Probe id -> (trials column, display label), in the ablation table's column order. The online
probes are read at the last epoch: the best epoch's accuracy would be a maximum over epochs taken
on the test images, biased upwards."""
NONE_LABELS = {"loss.tclip": "off"}
"""How a ``None`` parameter value reads, per flat key (``tclip=None`` turns the clip off)."""
FORMATS = ("csv", "md", "tex")


# --- helpers ----------------------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the frame lacks column(s) {', '.join(missing)}")


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-like values are not missing
        return False


def param_columns(trials: pd.DataFrame) -> list[str]:
    """The ``param.<flat key>`` columns of ``trials``, in frame order."""
    return [c for c in trials.columns if str(c).startswith(PARAM_PREFIX)]


def format_value(value: Any) -> str:
    """A compact, deterministic text form of one non-percent cell ('' for missing)."""
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def format_param(key: str, value: Any) -> str:
    """A parameter value as text; ``None`` reads as :data:`NONE_LABELS` says (``tclip`` -> "off")."""
    key = key.removeprefix(PARAM_PREFIX)
    return NONE_LABELS.get(key, "none") if _missing(value) else format_value(value)


def param_display(trials: pd.DataFrame, col: str) -> pd.Series:
    """A ``param.*`` column ready to show: ``None`` as its label ("off" for tclip), and "n/a" in
    rows of a study that never sampled the parameter (its values are all missing there).
    """
    values = trials[col].astype(object)
    if "study" in trials.columns:
        sampled = trials[col].notna().groupby(trials["study"]).transform("any").to_numpy(bool)
    else:
        sampled = np.ones(len(trials), dtype=bool)
    missing = values.isna().to_numpy(bool)
    values[missing & sampled] = format_param(col, None)
    values[missing & ~sampled] = "n/a"
    return values


def _stage_order(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows in a fixed order (study, stage, trial, seed), whatever order collect returned them in."""
    stage_rank = trials["stage"].map({s: i for i, s in enumerate(STAGES)}).fillna(len(STAGES))
    keys = ["study", "_stage_rank", *(c for c in ("trial", "seed") if c in trials.columns)]
    return trials.assign(_stage_rank=stage_rank).sort_values(keys, kind="stable").drop(columns="_stage_rank")


def _preferred_stage(rows: pd.DataFrame) -> pd.DataFrame:
    confirm = rows[rows["stage"] == "confirm"]
    return confirm if len(confirm) else rows


def _setting(rows: pd.DataFrame) -> str:
    labels = sorted({s for s in rows["setting"] if isinstance(s, str) and s})
    return " / ".join(labels)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std


def _mark(df: pd.DataFrame, percent: Iterable[str], pairs: Mapping[str, str], **attrs: Any) -> pd.DataFrame:
    df.attrs.update(percent=list(percent), pairs=dict(pairs), **attrs)
    return df


# --- tables -----------------------------------------------------------------------------------------


def results_table(trials: pd.DataFrame, metric: str = "probe_test_accuracy") -> pd.DataFrame:
    """Configurations ranked by ``metric`` (mean over seeds), best first.

    Only complete runs with a value for ``metric`` count; early-stopped, failed and running trials
    are left out here and counted by :func:`state_counts`. Rows are grouped by
    (``study``, ``config_id``); a parameter a study did not sample is an empty cell.

    Returns:
        Columns ``rank, study, setting, config_id, <flat param keys>, n_seeds, mean, std,
        final_online_acc`` (the last three fractions; ``std`` NaN when ``n_seeds == 1``;
        ``final_online_acc`` is the online linear probe's test accuracy at the last epoch, not its
        best epoch, which would be chosen on the test images).
    """
    _require(
        trials,
        ["study", "stage", "state", "setting", "config_id", metric, "final_online_acc"],
        "results_table",
    )
    params = param_columns(trials)
    shown = trials.assign(**{c: param_display(trials, c) for c in params})
    done = shown[(shown["state"] == "complete") & shown[metric].notna()]
    records = []
    for (study, config_id), group in done.groupby(["study", "config_id"], sort=True):
        rows = _preferred_stage(group)
        mean, std = _mean_std(rows[metric].to_numpy(float))
        record = {"study": study, "setting": _setting(group), "config_id": config_id}
        for col in params:
            value = rows[col].iloc[0]
            record[col.removeprefix(PARAM_PREFIX)] = math.nan if value == "n/a" else value
        record.update(n_seeds=len(rows), mean=mean, std=std, final_online_acc=rows["final_online_acc"].mean())
        records.append(record)
    columns = ["study", "setting", "config_id", *(c.removeprefix(PARAM_PREFIX) for c in params)]
    columns += ["n_seeds", "mean", "std", "final_online_acc"]
    table = pd.DataFrame.from_records(records, columns=columns)
    table = table.sort_values(["mean", "study", "config_id"], ascending=[False, True, True], kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    caption = (
        f"Configurations ranked by {metric} (percent; mean ± std over seeds, confirm-stage seeds where run)"
    )
    return _mark(
        table.reset_index(drop=True),
        percent=["mean", "std", "final_online_acc"],
        pairs={"mean": "std"},
        labels={"mean": "mean ± std", "n_seeds": "seeds", "final_online_acc": "online (last epoch)"},
        caption=caption,
    )


def state_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """Runs per (study, stage) and state, with a ``total``; states absent from a stage count 0."""
    _require(trials, ["study", "stage", "state"], "state_counts")
    extra = sorted(set(trials["state"].dropna()) - set(STATES))
    states = [*STATES, *extra]
    records = []
    for (study, stage), group in trials.groupby(["study", "stage"], sort=True):
        counts = group["state"].value_counts()
        record = {"study": study, "stage": stage, **{s: int(counts.get(s, 0)) for s in states}}
        records.append({**record, "total": len(group)})
    table = pd.DataFrame.from_records(records, columns=["study", "stage", *states, "total"])
    if len(table):
        rank = table["stage"].map({s: i for i, s in enumerate(STAGES)}).fillna(len(STAGES))
        table = table.assign(_r=rank).sort_values(["study", "_r", "stage"]).drop(columns="_r")
    return _mark(table.reset_index(drop=True), percent=[], pairs={}, caption="Runs by state")


def ablation_table(
    trials: pd.DataFrame,
    paper: Mapping[tuple[str, str, str], float] = PAPER_ABLATION,
    baseline: str | None = "paper default",
) -> pd.DataFrame:
    """The paper-style ablation table: one row per named ``setting``, columns per dataset and probe.

    Per setting and dataset, each probe (:data:`PROBES`) is the mean over that setting's complete
    runs (confirm-stage runs where it has any), with ``std`` when there is more than one. A
    ``"<dataset> <probe> paper"`` column sits beside ours only where ``paper`` (keyed by
    ``(setting, dataset, probe id)``, in percent) holds a value for that dataset and probe, and its
    cells are empty for settings the paper does not give. Rows without a setting are left out; a
    setting whose runs all failed keeps its row, with empty cells. ``baseline`` comes first, the
    other settings in study order.
    """
    columns = [col for col, _ in PROBES.values()]
    _require(trials, ["study", "stage", "trial", "state", "setting", "dataset", *columns], "ablation_table")
    for setting, dataset, probe in paper:
        if probe not in PROBES:
            raise ValueError(
                f"paper value for {(setting, dataset, probe)!r}: probe must be one of {list(PROBES)}"
            )
    named = _stage_order(trials[trials["setting"].map(lambda s: isinstance(s, str) and bool(s))])
    settings = list(dict.fromkeys(named["setting"]))
    if baseline in settings:
        settings.remove(baseline)
        settings.insert(0, baseline)
    datasets = sorted(set(named["dataset"].dropna()))
    done = named[named["state"] == "complete"]
    records = []
    for setting in settings:
        record: dict[str, Any] = {"setting": setting}
        for dataset in datasets:
            rows = _preferred_stage(done[(done["setting"] == setting) & (done["dataset"] == dataset)])
            record[f"{dataset} runs"] = len(rows)
            for probe, (col, label) in PROBES.items():
                mean, std = _mean_std(rows[col].to_numpy(float))
                record[f"{dataset} {label}"], record[f"{dataset} {label} std"] = mean, std
                if any(k[1:] == (dataset, probe) for k in paper):
                    value = paper.get((setting, dataset, probe))
                    record[f"{dataset} {label} paper"] = math.nan if value is None else value / 100.0
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=list(records[0]) if records else ["setting"])
    value_cols = [c for c in table.columns if c != "setting" and not c.endswith(" runs")]
    pairs = {c: f"{c} std" for c in value_cols if f"{c} std" in table.columns}
    labels = {c: c.removesuffix(" runs") + " n" for c in table.columns if c.endswith(" runs")}
    caption = (
        "Ablations: mean ± std over complete runs per setting (percent; online probes at the last epoch); "
        "paper cells only where the paper gives a value"
    )
    return _mark(table, percent=value_cols, pairs=pairs, labels=labels, caption=caption)


def _config_text(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={format_value(row[k])}" for k in keys if not _missing(row[k]))


def compare_table(
    trials: pd.DataFrame | Sequence[pd.DataFrame], metric: str = "probe_test_accuracy", top: int = 1
) -> pd.DataFrame:
    """Several studies side by side: each study's ``top`` configurations and its runs by state.

    ``trials`` is one concatenated frame or a list of per-study frames. Studies are ordered by their
    best mean ``metric``; a study with no complete run keeps a row with empty statistics.

    Returns:
        Columns ``study, rank, setting, config, n_seeds, mean, std, final_online_acc`` and one
        count column per state (runs over both stages).
    """
    if top < 1:
        raise ValueError(f"compare_table: top must be >= 1, got {top}")
    if not isinstance(trials, pd.DataFrame):
        frames = list(trials)
        if not frames:
            raise ValueError("compare_table: no studies given")
        trials = pd.concat(frames, ignore_index=True)
    if trials.empty:
        raise ValueError("compare_table: no trials given")
    ranked = results_table(trials, metric)
    keys = [c.removeprefix(PARAM_PREFIX) for c in param_columns(trials)]
    counts = trials.groupby("study")["state"].value_counts().unstack(fill_value=0)
    states = [*STATES, *sorted(set(counts.columns) - set(STATES))]
    columns = ["study", "rank", "setting", "config", "n_seeds", "mean", "std", "final_online_acc"]
    blocks = []
    for study in sorted(set(trials["study"])):
        best = ranked[ranked["study"] == study].head(top)
        config = [_config_text(r, keys) for _, r in best.iterrows()]
        block = best.assign(rank=range(1, len(best) + 1), config=config).reindex(columns=columns)
        if block.empty:  # no complete run: keep the study's row, with its counts
            block = pd.DataFrame({"study": [study], "setting": [""], "config": [""]}).reindex(columns=columns)
        block = block.assign(**{s: int(counts.loc[study].get(s, 0)) for s in states})
        blocks.append((best["mean"].max() if len(best) else -math.inf, study, block))
    blocks.sort(key=lambda b: (-b[0], b[1]))
    table = pd.concat([b[2] for b in blocks], ignore_index=True)
    return _mark(
        table,
        percent=["mean", "std", "final_online_acc"],
        pairs={"mean": "std"},
        labels={"mean": "mean ± std", "n_seeds": "seeds", "final_online_acc": "online (last epoch)"},
        caption=f"Studies compared: best configuration by {metric} (percent) and runs by state",
    )


# --- writers ----------------------------------------------------------------------------------------


def _cell(value: Any, percent: bool, std: Any = None) -> str:
    if _missing(value):
        return ""
    if not percent:
        return format_value(value)
    text = f"{100.0 * float(value):.1f}"
    return text if _missing(std) else f"{text} ± {100.0 * float(std):.1f}"


def _display(
    df: pd.DataFrame, percent: Iterable[str] | None, pairs: Mapping[str, str] | None
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, text cells and right-alignment flags, with each mean/std pair merged into one column."""
    percent = set(df.attrs.get("percent", ()) if percent is None else percent)
    pairs = dict(df.attrs.get("pairs", {}) if pairs is None else pairs)
    pairs = {m: s for m, s in pairs.items() if m in df.columns and s in df.columns}
    labels = df.attrs.get("labels", {})
    shown = [c for c in df.columns if c not in set(pairs.values())]
    headers, columns, right = [], [], []
    for col in shown:
        stds = df[pairs[col]] if col in pairs else [None] * len(df)
        columns.append([_cell(v, col in percent, s) for v, s in zip(df[col], stds)])
        headers.append(str(labels.get(col, col)))
        right.append(col in percent or pd.api.types.is_numeric_dtype(df[col].dtype))
    rows = [list(r) for r in zip(*columns)] if columns else []
    return headers, rows, right


def to_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV with raw values (fractions, not percent); floats to 6 significant digits."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([str(c) for c in df.columns])
    for row in df.itertuples(index=False):
        writer.writerow(
            [
                f"{float(v):.6g}"
                if isinstance(v, (float, np.floating)) and not _missing(v)
                else format_value(v)
                for v in row
            ]
        )
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _shown(df: pd.DataFrame, percent, pairs) -> tuple[pd.DataFrame, list[bool]]:
    """The table as people read it (text cells, each mean/std pair one column) and which columns
    are right-aligned."""
    headers, rows, right = _display(df, percent, pairs)
    return pd.DataFrame(rows, columns=headers, dtype=object), right


def to_markdown(
    df: pd.DataFrame, percent: Iterable[str] | None = None, pairs: Mapping[str, str] | None = None
) -> str:
    """A Markdown pipe table (pandas through tabulate); ``percent``/``pairs`` default to ``df.attrs``."""
    shown, right = _shown(df, percent, pairs)
    shown = shown.map(lambda c: c.replace("|", r"\|")).rename(columns=lambda h: h.replace("|", r"\|"))
    align = ["right" if r else "left" for r in right]
    return shown.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True) + "\n"


# Characters pandas' LaTeX escaping leaves alone that a LaTeX document needs written otherwise.
_TEX_SYMBOLS = {
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "±": r"$\pm$",
    "×": r"$\times$",
    "→": r"$\rightarrow$",
    "≈": r"$\approx$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "–": "--",
    "—": "---",
    "λ": r"$\lambda$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "τ": r"$\tau$",
    "μ": r"$\mu$",
    "σ": r"$\sigma$",
}
_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def _tex_symbols(text: str) -> str:
    return "".join(_TEX_SYMBOLS.get(ch, ch) for ch in str(text))


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and write ±, ×, → and Greek letters in math mode (for captions:
    table cells go through pandas' own escaping, then :data:`_TEX_SYMBOLS`)."""
    return "".join(_TEX_SPECIALS.get(ch) or _TEX_SYMBOLS.get(ch, ch) for ch in text)


def to_latex(
    df: pd.DataFrame,
    caption: str | None = None,
    label: str | None = None,
    percent: Iterable[str] | None = None,
    pairs: Mapping[str, str] | None = None,
) -> str:
    """A booktabs ``tabular`` (pandas' ``Styler.to_latex``), inside a ``table`` float when a
    caption or label is given."""
    shown, right = _shown(df, percent, pairs)
    styler = (
        shown.style.hide(axis="index")
        .format(escape="latex", formatter=_tex_symbols)
        .format_index(escape="latex", formatter=_tex_symbols, axis=1)
    )
    floating = caption is not None or label is not None
    return styler.to_latex(
        column_format="".join("r" if r else "l" for r in right),
        hrules=True,
        caption=None if caption is None else latex_escape(caption),
        label=label,
        position="ht" if floating else None,
        position_float="centering" if floating else None,
    )


def write_report_tables(
    tables: Mapping[str, pd.DataFrame], formats: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Write each table as ``<out_dir>/<name>.<fmt>`` for ``fmt`` in ``formats`` (csv, md, tex).

    LaTeX tables get the table's ``attrs["caption"]`` and the label ``tab:<name>``. Formats are
    checked before anything is written.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for name in tables:
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"table name {name!r} is not a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                to_csv(df, path)
            elif fmt == "md":
                path.write_text(to_markdown(df), encoding="utf-8")
            else:
                path.write_text(to_latex(df, df.attrs.get("caption"), f"tab:{name}"), encoding="utf-8")
            written.append(path)
    return written
