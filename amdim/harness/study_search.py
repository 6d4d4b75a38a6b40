"""Ray-side pieces of a study: the Optuna searcher and the driver's progress/MLflow callback.

They live in their own module because they subclass Ray classes (so this module imports Ray at
import time) and because Tune pickles them into the experiment state: ``Tuner.restore`` must be
able to import them by name.
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
from ray.tune.search.optuna import OptunaSearch


class AmdimOptunaSearch(OptunaSearch):
    """OptunaSearch that ranks on the final offline probe and records the online probe per epoch.

    Ray's OptunaSearch reports ``result[metric]`` to Optuna on every result, which fails when the
    ranking metric (the offline probe) exists only in a trial's last result. Here the per-epoch
    intermediate values are the online probe (``online_metric``, step = epoch), and a trial whose
    last result has no ranking metric (ASHA stopped it) is told to Optuna as PRUNED, not as a
    COMPLETE trial with an early, worse value; one whose last result says ``diverged`` (its loss
    stopped being finite) or ``trial_error`` (it failed in a way a retry would repeat: its sampled
    values make no valid configuration together, its data cannot be read, it ran out of memory;
    user attribute ``error`` says why) as FAIL. Each Optuna trial carries the Tune trial id as the
    user attribute ``tune_trial_id`` so MLflow runs and Optuna trials can be joined.
    """

    def __init__(self, *args: Any, online_metric: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._online_metric = online_metric

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None and config is not Searcher.FINISHED and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report_online(trial_id, result)

    def _report_online(self, trial_id: str, result: dict) -> None:
        import optuna

        value = result.get(self._online_metric)
        if value is None or value != value:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ot_trial = self._ot_trials[trial_id]
        frozen = ot_trial.storage.get_trial(ot_trial._trial_id)
        if step in frozen.intermediate_values or frozen.state.is_finished():
            return  # the final report repeats the last epoch; or an earlier driver finished it
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            ot_trial.report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            if result:  # the result ASHA stopped a trial on never reaches on_trial_result
                with contextlib.suppress(Exception):
                    self._report_online(trial_id, result)
            diverged = bool(result) and bool(result.get("diverged"))
            invalid = bool(result) and bool(result.get("trial_error") or result.get("invalid_config"))
            finished = bool(result) and result.get(self.metric) is not None and not diverged
            if diverged:
                state = "diverged"
            elif finished:
                state = "complete"
            else:
                state = "failed" if error or invalid else "early_stopped"
            try:
                self._ot_trials[trial_id].set_user_attr("state", state)
                if invalid:
                    self._ot_trials[trial_id].set_user_attr("error", str(result.get("error", ""))[:1000])
                if result and "epoch" in result:
                    self._ot_trials[trial_id].set_user_attr("epochs", int(result["epoch"]))
            except Exception:  # already finished in the database (told before a driver crash)
                pass
            if diverged or invalid:  # FAIL, not PRUNED: the configuration broke, it was not merely behind
                result, error = None, True
        import optuna

        # A trial an earlier driver told Optuna about already (it finished, then that driver
        # died before Tune saved its state) is finished in the database: nothing to tell again.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_complete(trial_id, result=result, error=error)


class EpochASHA(ASHAScheduler):
    """ASHA on ``epoch`` whose rungs all lie before the last epoch.

    ASHA places rungs at ``grace * rf**k`` below ``max_t``. When the trial length is such a value
    (4 epochs with grace 1 and rf 2), the top rung sits on the last epoch and ASHA cuts trials
    that have finished training, before their offline probe: wasted work that Optuna would record
    as pruned. Rungs at or after ``last_epoch`` are dropped; ``max_t`` stays above it so that ASHA
    never stops a trial merely for reaching the end.
    """

    def __init__(self, *, last_epoch: int, **kwargs: Any):
        super().__init__(time_attr="epoch", max_t=last_epoch + 1, **kwargs)
        for bracket in self._brackets:
            bracket._rungs = [(milestone, rec) for milestone, rec in bracket._rungs if milestone < last_epoch]

    def rungs(self) -> list[list[float]]:
        return [[m for m, _ in b._rungs] for b in self._brackets]


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

    def __init__(self, ctx: dict[str, Any], epochs: int, online: str, rank: str):
        self.ctx = ctx
        self.epochs = epochs
        self.online = online
        self.rank = rank
        self.t0 = time.time()
        self._started: dict[str, float] = {}
        self._running: set[str] = set()
        self._ended: dict[str, str | None] = {}  # trial id -> why it failed, or None

    @classmethod
    def current(cls) -> StudyProgress | None:
        return cls._current

    def setup(self, **info) -> None:
        StudyProgress._current = self
        self.t0 = time.time()
        self._running = set()

    def unfinished(self) -> list[str]:
        """Trials this driver started that had not ended when it stopped."""
        return sorted(self._running)

    def all_failed(self) -> str | None:
        """When every trial of the stage failed: how many, and the most common reason; else None."""
        from collections import Counter

        reasons = [r for r in self._ended.values()]
        if not reasons or any(r is None for r in reasons):
            return None
        reason, count = Counter(reasons).most_common(1)[0]
        return f"all {len(reasons)} trials failed; the most common reason ({count} of them): {reason}"

    def _say(self, text: str) -> None:
        print(f"[{self.ctx['study']}/{self.ctx['stage']} {time.time() - self.t0:6.0f}s] {text}", flush=True)

    @staticmethod
    def _name(trial) -> str:
        return trial.trial_id

    def _params(self, trial) -> str:
        config = trial.config.get("point", trial.config)
        return " ".join(f"{k}={v}" for k, v in config.items())

    def _key(self, trial):
        from amdim.harness.tracking_queue import RunKey

        return RunKey(
            self.ctx["tracking_uri"], experiment=self.ctx["experiment"], parent=self.ctx["parent_run_id"],
            tune_trial_id=trial.trial_id,
        )  # fmt: skip

    def _records(self):
        from amdim.harness.tracking_queue import SPOOL, process_queue

        return process_queue(Path(self.ctx["study_dir"]) / SPOOL if "study_dir" in self.ctx else None)

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
            self._ended[trial.trial_id] = reason
            self._say(f"trial {self._name(trial)} failed: {reason} (not restarted: it would fail again)")
            return
        if last.get("diverged"):  # the trial marked its own run diverged (FAILED)
            where = (
                f" at epoch {last['diverged_at_epoch']}, step {last['diverged_at_step']}"
                if "diverged_at_epoch" in last
                else ""
            )
            self._ended[trial.trial_id] = "diverged (non-finite loss)"
            self._say(f"trial {self._name(trial)} diverged (non-finite loss{where}): recorded as failed")
            return
        self._ended[trial.trial_id] = None
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
            f"checkpoint (failure {trial.num_failures} of at most {self.ctx['budget']['max_failures']})"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._running.discard(trial.trial_id)
        reason = _error_line(trial)
        self._ended[trial.trial_id] = reason
        self._say(f"trial {self._name(trial)} failed: {reason}")
        last = trial.last_result or {}
        self._records().terminate(
            self._key(trial), "FAILED",
            {"state": "failed", "error": reason, "stopped_at_epoch": last.get("epoch", 0)},
        )  # fmt: skip


class QuietTrialFailures(logging.Filter):
    """Drops Tune's "Trial task failed" log record (a traceback per failure): StudyProgress says
    in one line that the trial failed and whether it is restarted; the trial's error file keeps
    the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trial task failed")


def _error_line(trial) -> str:
    from amdim.harness.ray_train import last_error_line

    path = getattr(trial, "error_file", None) or ""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return "see the trial's error file"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return last_error_line(text) or (lines[-1][:200] if lines else "unknown error")
