"""Report tables from a hand-built ``trials`` frame, and golden files for their exported text.

The golden files live in ``tests/golden/`` and are compared byte for byte. After an intended change
of layout, rewrite them (the run fails on purpose: it compared nothing), review the diff, and run
the tests again without the variable before committing::

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_analysis_tables.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.paper import PAPER_ABLATION, PAPER_RESULTS
from analysis.tables import (
    ablation_table,
    compare_table,
    latex_escape,
    results_table,
    state_counts,
    to_csv,
    to_latex,
    to_markdown,
    write_report_tables,
)

GOLDEN = Path(__file__).parent / "golden"
NAN = math.nan
PARAMS = ("loss.reg_weight", "loss.tclip", "loss.pairs", "loss.n_mix", "aug.jitter_p")
DEFAULT = (0.05, 20.0, "1t5,1t7,5t5", 1, 0.8)

# (study, stage, trial, seed, state, setting, dataset, config_id, param overrides,
#  (probe_test, best_online, final_online, best_online_mlp))
# fmt: off
RUNS = [
    ("abl-syn", "search", 0, 0, "complete", "paper default", "synthetic", "a1c0de", {}, (0.612, 0.598, 0.590, 0.631)),
    ("abl-syn", "search", 1, 0, "complete", "λ = 0", "synthetic", "b2c1de", {"loss.reg_weight": 0.0}, (0.598, 0.580, 0.571, 0.610)),
    ("abl-syn", "search", 2, 0, "complete", "tclip off", "synthetic", "c3c2de", {"loss.tclip": None}, (0.575, 0.566, 0.560, 0.589)),
    ("abl-syn", "search", 3, 0, "early_stopped", "1t7 only", "synthetic", "d4c3de", {"loss.pairs": "1t7"}, (NAN, 0.410, 0.400, 0.430)),
    ("abl-syn", "search", 4, 0, "failed", "no colour jitter", "synthetic", "e5c4de", {"aug.jitter_p": 0.0}, (NAN, NAN, NAN, NAN)),
    ("abl-syn", "search", 5, 0, "complete", "k = 4 mixtures", "synthetic", "f6c5de", {"loss.n_mix": 4}, (0.603, 0.590, 0.588, 0.622)),
    ("abl-syn", "search", 6, 0, "complete", "", "synthetic", "0a7c6d", {"loss.reg_weight": 0.1, "loss.tclip": 10.0}, (0.607, 0.601, 0.597, 0.625)),
    ("abl-syn", "confirm", 0, 0, "complete", "paper default", "synthetic", "a1c0de", {}, (0.615, 0.600, 0.596, 0.633)),
    ("abl-syn", "confirm", 1, 1, "complete", "paper default", "synthetic", "a1c0de", {}, (0.604, 0.593, 0.590, 0.627)),
    ("abl-syn", "confirm", 2, 2, "complete", "paper default", "synthetic", "a1c0de", {}, (0.609, 0.597, 0.592, 0.629)),
    ("abl-syn", "confirm", 3, 0, "complete", "λ = 0", "synthetic", "b2c1de", {"loss.reg_weight": 0.0}, (0.592, 0.583, 0.579, 0.606)),
    ("abl-syn", "confirm", 4, 1, "complete", "λ = 0", "synthetic", "b2c1de", {"loss.reg_weight": 0.0}, (0.601, 0.588, 0.585, 0.614)),
    ("abl-c10", "search", 0, 0, "complete", "paper default", "cifar10", "a1c0de", {}, (0.883, 0.871, 0.869, 0.892)),
    ("abl-c10", "search", 1, 0, "complete", "λ = 0", "cifar10", "b2c1de", {"loss.reg_weight": 0.0}, (0.871, 0.860, 0.858, 0.880)),
    ("abl-c10", "search", 2, 0, "early_stopped", "tclip off", "cifar10", "c3c2de", {"loss.tclip": None}, (NAN, 0.702, 0.700, 0.715)),
    ("reg-search", "search", 0, 0, "complete", "", "synthetic", "11aa22", {"loss.reg_weight": 0.02}, (0.600, 0.592, 0.590, 0.618)),
    ("reg-search", "search", 1, 0, "complete", "", "synthetic", "33bb44", {"loss.reg_weight": 0.08}, (0.611, 0.599, 0.596, 0.626)),
    ("reg-search", "search", 2, 0, "running", "", "synthetic", "55cc66", {"loss.reg_weight": 0.2}, (NAN, 0.450, 0.450, 0.470)),
    ("reg-search", "search", 3, 0, "failed", "", "synthetic", "77dd88", {"loss.reg_weight": 0.5}, (NAN, NAN, NAN, NAN)),
]
# fmt: on


def make_trials() -> pd.DataFrame:
    """The fixture frame in collect's schema; the ``reg-search`` study samples ``loss.reg_weight`` only."""
    rows = []
    for study, stage, trial, seed, state, setting, dataset, config_id, over, accs in RUNS:
        probe, best, final, mlp = accs
        epochs = {"complete": 10, "early_stopped": 3, "failed": 0, "running": 5}[state]
        row = {
            "study": study,
            "stage": stage,
            "trial": trial,
            "run_id": f"{study}-{stage}-{trial}-s{seed}",
            "state": state,
            "seed": seed,
            "setting": setting,
            "dataset": dataset,
            "config_id": config_id,
            "epochs": epochs,
            "wall_s": 61.5 * epochs,
            "best_online_acc": best,
            "final_online_acc": final,
            "best_online_mlp_acc": mlp + 0.01 if mlp == mlp else mlp,  # a best epoch above the last
            "final_online_mlp_acc": mlp,
            "probe_test_accuracy": probe,
            "probe_val_accuracy": probe + 0.01,
        }
        values = dict(zip(PARAMS, DEFAULT))
        if study == "reg-search":
            values = dict.fromkeys(PARAMS)
        values.update(over)
        row.update({f"param.{k}": v for k, v in values.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1" and (
        not path.exists() or path.read_text(encoding="utf-8") != text
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        # A rewrite compares nothing: it fails, so that a rewritten file never passes unreviewed
        # (run again: each run rewrites the next differing file of a test, and passes the same ones).
        pytest.fail(f"rewrote {path}: review `git diff tests/golden`, then run again without UPDATE_GOLDEN")
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


# A test-only paper value: the synthetic dataset has no paper numbers, so this cannot be mistaken
# for a transcribed cell. It exercises the paper column next to ours.
FIXTURE_PAPER = {("paper default", "synthetic", "offline_linear"): 61.0}


# --- golden files -----------------------------------------------------------------------------------


def test_results_golden(tmp_path):
    table = results_table(make_trials())
    check_golden("results.csv", to_csv(table, tmp_path / "results.csv").read_text(encoding="utf-8"))
    check_golden("results.md", to_markdown(table))
    check_golden("results.tex", to_latex(table, caption=table.attrs["caption"], label="tab:results"))


def test_ablation_golden():
    table = ablation_table(make_trials(), paper=FIXTURE_PAPER)
    check_golden("ablation.md", to_markdown(table))
    check_golden("ablation.tex", to_latex(table, caption=table.attrs["caption"], label="tab:ablation"))


def test_compare_golden():
    trials = make_trials()
    per_study = [trials[trials["study"] == s] for s in ("reg-search", "abl-syn", "abl-c10")]
    table = compare_table(per_study)
    check_golden("compare.md", to_markdown(table))
    pd.testing.assert_frame_equal(table, compare_table(trials))


# --- results table ----------------------------------------------------------------------------------


def test_results_ranked_best_first_with_confirm_seeds_preferred():
    table = results_table(make_trials())
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["mean"].is_monotonic_decreasing
    # abl-c10's paper default (one search seed) leads; the confirm-stage mean of abl-syn's paper
    # default (0.6093) replaces its search value 0.612.
    assert list(table["config_id"][:2]) == ["a1c0de", "b2c1de"]
    syn_default = table[(table["study"] == "abl-syn") & (table["config_id"] == "a1c0de")].iloc[0]
    assert syn_default["n_seeds"] == 3
    assert syn_default["mean"] == pytest.approx(np.mean([0.615, 0.604, 0.609]))


def test_results_mean_std_match_numpy():
    table = results_table(make_trials()).set_index(["study", "config_id"])
    for key, values in {
        ("abl-syn", "a1c0de"): [0.615, 0.604, 0.609],
        ("abl-syn", "b2c1de"): [0.592, 0.601],
        ("abl-syn", "0a7c6d"): [0.607],
    }.items():
        row = table.loc[key]
        assert row["n_seeds"] == len(values)
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        if len(values) > 1:
            assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        else:
            assert math.isnan(row["std"])
    # the online probe at the last epoch, never its best epoch (a maximum taken on the test images)
    assert table.loc[("abl-syn", "a1c0de"), "final_online_acc"] == pytest.approx(
        np.mean([0.596, 0.590, 0.592])
    )


def test_results_exclude_unfinished_trials():
    trials = make_trials()
    table = results_table(trials)
    excluded = trials.loc[trials["state"] != "complete", ["study", "config_id"]]
    ranked = set(zip(table["study"], table["config_id"]))
    assert not set(zip(excluded["study"], excluded["config_id"])) & ranked
    assert ("abl-syn", "c3c2de") in ranked and ("abl-c10", "c3c2de") not in ranked  # same config
    assert len(table) == trials[trials["state"] == "complete"].groupby(["study", "config_id"]).ngroups


def test_results_param_display():
    table = results_table(make_trials()).set_index(["study", "config_id"])
    assert table.loc[("abl-syn", "c3c2de"), "loss.tclip"] == "off"  # None tclip means off
    assert math.isnan(table.loc[("reg-search", "11aa22"), "loss.tclip"])  # not sampled: empty
    assert "| off " in to_markdown(results_table(make_trials()))


def test_state_counts():
    counts = state_counts(make_trials()).set_index(["study", "stage"])
    assert counts.loc[("abl-syn", "search")].to_dict() == {
        "complete": 5,
        "early_stopped": 1,
        "diverged": 0,
        "failed": 1,
        "running": 0,
        "total": 7,
    }
    assert counts.loc[("abl-syn", "confirm"), "complete"] == 5
    assert counts.loc[("reg-search", "search"), "running"] == 1
    table = state_counts(make_trials())
    assert list(table.loc[table["study"] == "abl-syn", "stage"]) == ["search", "confirm"]


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="config_id"):
        results_table(make_trials().drop(columns="config_id"))


# --- ablation table ---------------------------------------------------------------------------------


def test_ablation_rows_and_cells():
    table = ablation_table(make_trials()).set_index("setting")
    assert list(table.index) == [
        "paper default",
        "λ = 0",
        "tclip off",
        "1t7 only",
        "no colour jitter",
        "k = 4 mixtures",
    ]
    assert table.loc["paper default", "synthetic offline linear"] == pytest.approx(
        np.mean([0.615, 0.604, 0.609])
    )
    assert table.loc["λ = 0", "synthetic online MLP std"] == pytest.approx(np.std([0.606, 0.614], ddof=1))
    assert table.loc["paper default", "cifar10 online linear"] == pytest.approx(0.869)
    assert math.isnan(table.loc["paper default", "cifar10 online linear std"])  # one run: no std
    assert math.isnan(table.loc["1t7 only", "synthetic offline linear"])  # early-stopped only
    assert table.loc["no colour jitter", "synthetic runs"] == 0


def test_ablation_paper_column_only_where_the_paper_gives_a_value():
    plain = ablation_table(make_trials())
    assert not [c for c in plain.columns if c.endswith("paper")]  # PAPER_ABLATION holds no cells
    table = ablation_table(make_trials(), paper=FIXTURE_PAPER).set_index("setting")
    paper = table["synthetic offline linear paper"]
    assert paper["paper default"] == pytest.approx(0.61)
    assert paper.drop("paper default").isna().all()
    assert "cifar10 offline linear paper" not in table.columns
    md = to_markdown(table.reset_index())
    header = [c.strip() for c in md.splitlines()[0].split("|")]
    col = header.index("synthetic offline linear paper")
    cells = {r.split("|")[1].strip(): r.split("|")[col].strip() for r in md.splitlines()[2:]}
    assert cells["paper default"] == "61.0"
    assert all(v == "" for k, v in cells.items() if k != "paper default")


def test_ablation_rejects_unknown_probe():
    with pytest.raises(ValueError, match="probe must be one of"):
        ablation_table(make_trials(), paper={("paper default", "synthetic", "linear"): 1.0})


def test_paper_numbers_only_from_the_spec():
    assert PAPER_ABLATION == {}, "Table 3 is not transcribed (spec 8.3); cite the PDF when adding cells"
    values = {k: v.value for k, v in PAPER_RESULTS.items()}
    assert values[("AMDIM large", "imagenet", "linear")] == 68.1
    assert values[("AMDIM large", "places205", "linear")] == 55.0
    assert {v.value for v in PAPER_RESULTS.values() if v.secondary} == {63.5, 91.2, 70.2, 93.8, 94.2}


# --- compare table ----------------------------------------------------------------------------------


def test_compare_table_best_per_study_and_counts():
    table = compare_table(make_trials(), top=2).set_index(["study", "rank"])
    assert list(dict.fromkeys(table.index.get_level_values(0))) == ["abl-c10", "reg-search", "abl-syn"]
    assert table.loc[("reg-search", 1), "config"] == "loss.reg_weight=0.08"
    assert table.loc[("abl-syn", 1), "failed"] == 1 and table.loc[("abl-syn", 1), "complete"] == 10
    with pytest.raises(ValueError, match="no studies"):
        compare_table([])


# --- writers ----------------------------------------------------------------------------------------


def test_latex_escaping():
    assert latex_escape("loss.reg_weight 50% & #1 ± λ = 0 {x}") == (
        r"loss.reg\_weight 50\% \& \#1 $\pm$ $\lambda$ = 0 \{x\}"
    )
    assert latex_escape("a\\b ~ ^") == r"a\textbackslash{}b \textasciitilde{} \textasciicircum{}"
    df = pd.DataFrame({"setting": ["λ = 0"], "acc_mean": [0.5], "acc_std": [0.01]})
    df.attrs.update(percent=["acc_mean", "acc_std"], pairs={"acc_mean": "acc_std"})
    tex = to_latex(df)
    assert r"setting & acc\_mean \\" in tex
    assert r"$\lambda$ = 0 & 50.0 $\pm$ 1.0 \\" in tex
    assert tex.startswith(r"\begin{tabular}{lr}") and r"\toprule" in tex and r"\bottomrule" in tex
    caption = to_latex(df, caption="100% of runs", label="tab:x")
    assert r"\caption{100\% of runs}" in caption and r"\label{tab:x}" in caption


def test_markdown_formats_pairs_and_blanks():
    df = pd.DataFrame({"name": ["a|b", "c"], "mean": [0.55, NAN], "std": [0.012, NAN], "n": [2, 1]})
    df.attrs.update(percent=["mean", "std"], pairs={"mean": "std"})
    assert to_markdown(df) == (
        "| name   |       mean |   n |\n"
        "|:-------|-----------:|----:|\n"
        "| a\\|b   | 55.0 ± 1.2 |   2 |\n"
        "| c      |            |   1 |\n"
    )


def test_write_report_tables(tmp_path):
    tables = {"results": results_table(make_trials()), "states": state_counts(make_trials())}
    paths = write_report_tables(tables, ["csv", "md", "tex"], tmp_path / "out")
    assert [p.name for p in paths] == [f"{n}.{f}" for n in tables for f in ("csv", "md", "tex")]
    assert all(p.stat().st_size > 0 for p in paths)
    assert r"\label{tab:results}" in (tmp_path / "out" / "results.tex").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="unknown table format 'xlsx'"):
        write_report_tables(tables, ["md", "xlsx"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "spans, most",
    [
        ([], 0),
        ([(0, 10)], 1),
        ([(0, 10), (5, 15), (10, 20)], 2),  # the third starts as the first ends
        ([(0, 1), (1, 2), (2, 3)], 1),
        ([(0, 10), (1, 9), (2, 8), (3, None)], 4),  # a run still open counts
    ],
)
def test_packing_benchmark_counts_trials_at_once(spans, most):
    from analysis.bench_studies import _max_overlap

    assert _max_overlap(spans) == most
