"""How a study searches: Optuna behind Ray Tune's ``Searcher`` interface, ASHA on the epoch, and
the driver's progress lines and MLflow bookkeeping.

Everything here uses the public APIs of Ray Tune (``Searcher``, ``ASHAScheduler``, ``Callback``)
and Optuna (``create_study``, ``enqueue_trial``, ``ask``, ``tell``, ``Trial.report``). The Optuna
database is the record of the search: the searcher keeps only which Optuna trial runs each Tune
trial (the user attribute ``tune_trial_id``), and reads a trial's state from the database before
it writes to it, so that a resumed study (after Ctrl-C or a killed driver) never tells Optuna
twice about a trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from amdim.harness.study.context import TrialContext
from amdim.harness.study.records import (
    STATE_COMPLETE,
    STATE_DIVERGED,
    STATE_EARLY,
    STATE_FAILED,
    trial_key,
)
from amdim.harness.tracking_queue import SPOOL, process_queue


class StudySearcher(Searcher):
    """Optuna's sampler proposes each Tune trial's configuration; the labelled points come first.

    Per trial: ``suggest`` asks Optuna (an enqueued labelled point, else the sampler's choice over
    ``space``) and records the Tune trial id on the Optuna trial; each epoch's ``online_metric``
    becomes an intermediate value (step = epoch); the end is told once: COMPLETE with the rank
    metric (the final offline probe), PRUNED when ASHA stopped the trial (its last result has no
    rank metric), FAIL when its loss diverged or it failed in a way a retry would repeat (user
    attribute ``error`` says why) or its retries ran out.

    Args:
        study_name: the Optuna study (created in ``storage_url`` when missing).
        storage_url: an RDB URL (``sqlite:////abs/optuna.db``).
        space: flat config key -> Optuna distribution.
        sampler: the Optuna sampler (seeded).
        metric: the rank metric, maximised.
        online_metric: the per-epoch signal recorded as intermediate values.
        points: labelled settings, evaluated first (enqueued when the study has no trial yet).
    """

    def __init__(
        self,
        *,
        study_name: str,
        storage_url: str,
        space: dict[str, Any],
        sampler: Any,
        metric: str,
        online_metric: str,
        points: list[dict[str, Any]] | None = None,
    ):
        super().__init__(metric=metric, mode="max")
        self.study_name = study_name
        self.storage_url = storage_url
        self.space = dict(space)
        self.sampler = sampler
        self.online_metric = online_metric
        self.points = [dict(p) for p in points or []]
        self._trials: dict[str, Any] = {}  # Tune trial id -> the optuna.trial.Trial it runs
        self._study = None

    # -- state -------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_study"] = None  # opened again where it is used
        return state

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump({"trials": self._trials}, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        self._trials = dict(saved.get("trials", {}))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True  # the space and the metric are the spec's, given at construction

    def study(self):
        """The Optuna study, opened (and created, with the labelled points enqueued) on first use."""
        if self._study is None:
            import optuna

            from amdim.harness.study.layout import open_rdb

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = open_rdb(self.storage_url)  # a reader may be creating the tables too
            self._study = optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self.sampler,
                direction="maximize", load_if_exists=True,
            )  # fmt: skip
            if not self._study.get_trials(deepcopy=False):
                for point in self.points:
                    self._study.enqueue_trial(point)
        return self._study

    def _frozen(self, trial_id: str):
        """The Optuna trial of a Tune trial as the database has it now, or None."""
        trial = self._trials.get(trial_id)
        if trial is None:
            return None
        return self.study().get_trials(deepcopy=False)[trial.number]

    # -- Tune's calls ------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study().ask(fixed_distributions=self.space)
        trial.set_user_attr("tune_trial_id", trial_id)
        self._trials[trial_id] = trial
        return {key: trial.params[key] for key in self.space}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report_online(trial_id, result)

    def _report_online(self, trial_id: str, result: dict) -> None:
        value = result.get(self.online_metric)
        frozen = self._frozen(trial_id)
        if value is None or value != value or frozen is None or frozen.state.is_finished():
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step not in frozen.intermediate_values:  # the final report repeats the last epoch
            self._trials[trial_id].report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        frozen = self._frozen(trial_id)
        if frozen is None or frozen.state.is_finished():
            return  # not this searcher's, or told already (by a driver that died before Tune saved)
        result = result or {}
        with contextlib.suppress(
            Exception
        ):  # the result ASHA stopped a trial on never reaches on_trial_result
            self._report_online(trial_id, result)
        trial = self._trials[trial_id]
        diverged = bool(result.get("diverged"))
        failed = bool(result.get("trial_error") or result.get("invalid_config"))
        rank = result.get(self.metric)
        if diverged:
            state, outcome = STATE_DIVERGED, optuna.trial.TrialState.FAIL
        elif failed or (error and rank is None):
            state, outcome = STATE_FAILED, optuna.trial.TrialState.FAIL
        elif rank is not None:
            state, outcome = STATE_COMPLETE, optuna.trial.TrialState.COMPLETE
        else:
            state, outcome = STATE_EARLY, optuna.trial.TrialState.PRUNED
        trial.set_user_attr("state", state)
        if failed:
            trial.set_user_attr("error", str(result.get("error", ""))[:1000])
        if "epoch" in result:
            trial.set_user_attr("epochs", int(result["epoch"]))
        values = float(rank) if outcome == optuna.trial.TrialState.COMPLETE else None
        self.study().tell(trial.number, values, state=outcome, skip_if_finished=True)


def asha(
    *, last_epoch: int, metric: str, mode: str, grace_period: int, reduction_factor: int
) -> ASHAScheduler:
    """ASHA on ``epoch`` with every rung before the last epoch.

    ASHA places rungs at ``grace * rf**k`` up to ``max_t``. A rung on the last epoch (4 epochs
    with grace 1 and rf 2) would cut trials that have finished training, before their offline
    probe: wasted work that Optuna would record as pruned. So ``max_t`` lies half an epoch before
    the last one (the last rung is then the largest ``grace * rf**k`` below it, with no rounding
    trouble where ``last_epoch - 1`` is a power of ``rf``), and ``stop_last_trials=False`` keeps
    ASHA from stopping a trial merely for passing ``max_t``.
    """
    return ASHAScheduler(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        max_t=last_epoch - 0.5,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        stop_last_trials=False,
    )


def fail_orphans(name: str) -> int:
    """Optuna trials left RUNNING that no Tune trial will finish (asked by a driver that died
    before Tune saved its state): told FAIL. Run at the end of a finished search stage, when every
    trial Tune knows of has ended."""
    import optuna

    from amdim.harness.study.layout import optuna_study

    study = optuna_study(name)
    if study is None:
        return 0
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for frozen in running:
        study.tell(frozen.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return len(running)


class StudyProgress(Callback):
    """One line per trial event on the driver, and the driver's part of each trial's MLflow record.

    A trial that finishes or fails in a way a retry would repeat marks its own MLflow run. One
    that ASHA stops is killed before it can, so its run is marked here (``state=early_stopped``,
    status KILLED), and so is one whose retries ran out (``failed``). Here too: the tag
    ``checkpoint_path`` (the ``checkpoint.pt`` of the trial's latest checkpoint, where Ray stored
    it) and the metric ``startup_s``, the seconds from Tune starting the trial's actor to the end
    of its first training step (from the first report after each start). Every write goes through
    the driver's tracking queue: never waiting for the server, never raised into Tune.

    The callback Tune runs is found again by :meth:`current` (on a resumed study it is the one
    Tune restored with the experiment): the driver asks it which trials an interrupted stage left
    unfinished, and whether every trial failed.
    """

    _current: StudyProgress | None = None
    _context: TrialContext | None = None

    def __init__(self, ctx: TrialContext, epochs: int, online: str, rank: str):
        self.ctx = ctx
        self.epochs = epochs
        self.online = online
        self.rank = rank
        self.t0 = time.time()
        self._started: dict[str, float] = {}
        self._running: set[str] = set()

    @classmethod
    def current(cls) -> StudyProgress | None:
        """The callback of the experiment Tune ran last in this process."""
        return cls._current

    @classmethod
    def use(cls, ctx: TrialContext) -> None:
        """The context of the stage about to run: a callback Tune restores from an earlier driver
        takes it up in :meth:`setup` (its own names that driver's parent run and folders)."""
        cls._context = ctx

    def setup(self, **info) -> None:
        StudyProgress._current = self
        if StudyProgress._context is not None:
            self.ctx = StudyProgress._context
        self.t0 = time.time()
        self._started, self._running = {}, set()

    def unfinished(self) -> list[str]:
        """Trials this driver started that had not ended when it stopped."""
        return sorted(self._running)

    def _say(self, text: str) -> None:
        print(f"[{self.ctx.study}/{self.ctx.stage} {time.time() - self.t0:6.0f}s] {text}", flush=True)

    @staticmethod
    def _name(trial) -> str:
        return trial.trial_id

    def _params(self, trial) -> str:
        config = trial.config.get("point", trial.config)
        return " ".join(f"{k}={v}" for k, v in config.items())

    def _key(self, trial):
        return trial_key(self.ctx, trial.trial_id)

    def _records(self):
        return process_queue(Path(self.ctx.study_dir) / SPOOL)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.time()
        self._running.add(trial.trial_id)
        self._say(f"trial {self._name(trial)} started: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("first_step_at") is not None and trial.trial_id in self._started:
            startup = float(result["first_step_at"]) - self._started.pop(trial.trial_id)
            self._records().metrics(self._key(trial), {"startup_s": startup}, step=int(result["epoch"]))
        if result.get("checkpoint_path"):  # Train path: TuneReportCallback passes the Train checkpoint on
            path = os.path.join(result["checkpoint_path"], "checkpoint.pt")
            self._records().tags(self._key(trial), {"checkpoint_path": path})
        if self.rank in result or result.get("diverged") or result.get("trial_error"):
            return  # the final report; on_trial_complete prints it
        value = result.get(self.online)
        shown = f"{value:.4f}" if isinstance(value, float) else value
        self._say(
            f"trial {self._name(trial)} epoch {result.get('epoch')}/{self.epochs} {self.online} {shown}"
        )

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        path = os.path.join(checkpoint.path, "checkpoint.pt")
        self._records().tags(self._key(trial), {"checkpoint_path": path})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._running.discard(trial.trial_id)
        last = trial.last_result or {}
        if last.get("trial_error") or last.get("invalid_config"):  # the trial marked its own run failed
            reason = last.get("error", "invalid configuration")
            self._say(f"trial {self._name(trial)} failed: {reason} (not restarted: it would fail again)")
            return
        if last.get("diverged"):  # the trial marked its own run diverged (FAILED)
            where = (
                f" at epoch {last['diverged_at_epoch']}, step {last['diverged_at_step']}"
                if "diverged_at_epoch" in last
                else ""
            )
            self._say(f"trial {self._name(trial)} diverged (non-finite loss{where}): recorded as failed")
            return
        if self.rank in last:
            other = "probe_test_accuracy" if self.rank == "probe_val_accuracy" else "probe_val_accuracy"
            self._say(
                f"trial {self._name(trial)} complete: {self.rank} {last[self.rank]:.4f} "
                f"({other} {last.get(other, float('nan')):.4f})"
            )
            return
        self._say(f"trial {self._name(trial)} early-stopped by ASHA at epoch {last.get('epoch', 0)}")
        self._records().terminate(
            self._key(trial), "KILLED", {"state": "early_stopped", "stopped_at_epoch": last.get("epoch", 0)}
        )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(
            f"trial {self._name(trial)} failed ({_error_line(trial)}); Tune restarts it from its last "
            f"checkpoint (failure {trial.num_failures} of at most {self.ctx.budget.max_failures})"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._running.discard(trial.trial_id)
        reason = _error_line(trial)
        self._say(f"trial {self._name(trial)} failed: {reason}")
        last = trial.last_result or {}
        self._records().terminate(
            self._key(trial), "FAILED",
            {"state": STATE_FAILED, "error": reason, "stopped_at_epoch": last.get("epoch", 0)},
        )  # fmt: skip


class QuietTrialFailures(logging.Filter):
    """Drops Tune's "Trial task failed" log record (a traceback per failure): StudyProgress says
    in one line that the trial failed and whether it is restarted; the trial's error file keeps
    the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trial task failed")


def _error_line(trial) -> str:
    """The cause of a trial's error, in one line, from its error file."""
    from amdim.harness.ray_train import last_error_line

    path = getattr(trial, "error_file", None) or ""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return "see the trial's error file"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return last_error_line(text) or (lines[-1][:200] if lines else "unknown error")
