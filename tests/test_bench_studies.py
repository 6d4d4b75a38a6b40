"""The study benchmark's split of a study's slot time (``analysis.bench_studies``)."""

from __future__ import annotations

import pytest

from analysis.bench_studies import idle_tail_slot_s, spread


def test_the_idle_tail_is_the_free_slot_time_after_the_last_trial_started():
    # two slots; the last trial starts at 10 while the other slot's trial ends at 12 and nothing
    # follows it: one slot idle from 12 to 20
    spans = [(0.0, 9.5), (0.5, 12.0), (9.7, 10.0), (10.0, 20.0)]
    assert idle_tail_slot_s(spans, 2) == pytest.approx(8.0)


def test_no_idle_tail_when_the_last_trials_end_together():
    spans = [(0.0, 10.0), (1.0, 10.0), (10.2, 20.0), (10.4, 20.0)]
    # the 0.2 s before the last start is the harness's, not the tail's
    assert idle_tail_slot_s(spans, 2) == 0.0


def test_every_slot_idle_counts_and_no_trials_means_no_tail():
    # a budget of one trial leaves two slots idle
    assert idle_tail_slot_s([(0.0, 4.0)], 3) == pytest.approx(8.0)
    assert idle_tail_slot_s([(0.0, 10.0), (2.0, 4.0)], 3) == pytest.approx(2 * 1 + 6 * 2)
    assert idle_tail_slot_s([], 2) == 0.0


def _run(**paths):
    return {"paths": {p: {"overhead_fraction": v, "idle_tail_slot_s": 10 * v} for p, v in paths.items()}}


def test_the_spread_of_repeated_runs_gives_each_run_and_the_median_per_path():
    runs = [_run(tune=0.31, train=0.60), _run(tune=0.27, train=0.66), _run(tune=0.28, train=0.58)]
    out = spread(runs)
    assert out["tune"]["overhead_fraction"] == {
        "runs": [0.31, 0.27, 0.28],
        "min": 0.27,
        "median": 0.28,
        "max": 0.31,
    }
    assert out["train"]["overhead_fraction"]["median"] == 0.60
    assert out["tune"]["idle_tail_slot_s"]["max"] == pytest.approx(3.1)
    # a figure no run has is left out, not reported as zero
    assert "overhead_fraction_without_idle_tail" not in out["tune"]


def test_a_path_missing_from_a_run_is_left_out_of_that_paths_values():
    out = spread([_run(tune=0.30, train=0.61), _run(tune=0.26)])
    assert out["tune"]["overhead_fraction"]["runs"] == [0.30, 0.26]
    assert out["tune"]["overhead_fraction"]["median"] == pytest.approx(0.28)
    assert out["train"]["overhead_fraction"] == {"runs": [0.61], "min": 0.61, "median": 0.61, "max": 0.61}
