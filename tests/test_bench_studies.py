"""The study benchmark's split of a study's slot time (``analysis.bench_studies``)."""

from __future__ import annotations

import pytest

from analysis.bench_studies import idle_tail_slot_s


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
