"""The names a study started before ``amdim/harness/study/`` saved in its Tune state.

A study's ``tuner.pkl`` refers to its searcher, scheduler and callback by module path; those of a
study started by an earlier amdim name this module. Importing them from here resumes such a study
on the current code: the searcher (an ``OptunaSearch`` subclass then) becomes a
:class:`~amdim.harness.study.search.StudySearcher` on the same Optuna study, keeping the Optuna
trials its Tune trials run; the scheduler was Ray's ASHA with its rungs already cut, restored as
saved; the progress callback is today's. New studies never refer to this module.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from amdim.harness.study.search import QuietTrialFailures, StudyProgress, StudySearcher

__all__ = ["AmdimOptunaSearch", "EpochASHA", "QuietTrialFailures", "StudyProgress"]


class AmdimOptunaSearch(StudySearcher):
    """An earlier amdim's searcher, resumed as a :class:`StudySearcher` (see the module doc)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_ot_study" in state:  # the OptunaSearch layout of an earlier amdim
            self._adopt(state)
        else:
            self.__dict__.update(state)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        if isinstance(saved, dict) and "_ot_study" in saved:
            self._adopt(saved)
        else:
            super().restore(checkpoint_path)

    def _adopt(self, legacy: dict[str, Any]) -> None:
        """Take over the Optuna study, space, sampler, metrics and Tune-trial -> Optuna-trial map of
        an earlier amdim's searcher (read by :func:`amdim.harness._compat.legacy_optuna_search`)."""
        from amdim.harness._compat import legacy_optuna_search

        saved = legacy_optuna_search(legacy)
        trials = saved.pop("trials")
        StudySearcher.__init__(self, **saved, points=[])  # the points were enqueued when it started
        self._trials = trials


class EpochASHA(ASHAScheduler):
    """An earlier amdim's ASHA, restored as saved (its rungs were cut when it was made)."""
