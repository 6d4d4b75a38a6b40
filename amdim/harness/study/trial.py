"""One study trial: the function Ray Tune runs in the trial's actor, and the two ways it trains.

* the **Tune path** (one worker): :func:`run_trial` runs the trainer right in the trial's Tune
  actor (:func:`amdim.harness.trial.train_and_report` with ``session=ray.tune``), which holds the
  trial's CPUs, GPU share and custom resources; actors are reused from trial to trial;
* the **Train path** (several workers): the trial function builds a ``TorchTrainer`` running
  :func:`amdim.harness.ray_train.worker_loop` (the same body with ``session=ray.train``), the
  Train-driver-inside-a-Tune-function pattern of Ray 2.60; the Train run's name is the Tune trial
  id, so a restarted trial resumes its own run.

Either way every epoch's metrics are reported to Tune with a checkpoint (the online signal drives
ASHA when it is on), a restarted trial continues from its last checkpoint, and a finished trial
ends with the offline linear probe, which ranks it for Optuna.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from amdim.config import from_flat, to_flat
from amdim.errors import ConfigError
from amdim.harness.study.context import TrialContext
from amdim.harness.study.records import (
    STATE_COMPLETE,
    STATE_DIVERGED,
    STATE_FAILED,
    STATE_RUNNING,
    trial_key,
    trial_run,
)
from amdim.harness.tracking_queue import SPOOL


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: build the trial's config, open its MLflow run, train it.

    A trial that fails in a way a retry would repeat (its sampled values make no valid
    configuration together, its data cannot be read, it runs out of memory) ends at once as
    failed, with the reason on its MLflow run and its Optuna trial; anything else (a process that
    died) is raised, and Tune restarts the trial from its last checkpoint. Nothing here waits for
    the tracking server: MLflow writes go through this process's tracking queue.
    """
    import ray
    import ray.tune

    from amdim.harness.tracking_queue import flush_seconds, process_queue
    from amdim.harness.trial import read_outcome, write_outcome

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    point = dict(config["point"]) if "point" in config else dict(config)
    seed = point.pop("_seed", None)
    source = point.pop("_source_trial", None)
    sampled = {k: point[k] for k in ctx.keys}
    flat = {**ctx.base_flat, **sampled}
    if seed is not None:
        flat["train.seed"] = seed
    try:
        cfg = from_flat(flat)
    except ConfigError as exc:
        invalid = str(exc)
    else:
        flat, invalid = to_flat(cfg), None

    sdir = Path(ctx.study_dir)
    outcome_path = sdir / "trials" / f"{ctx.stage}-{trial_id}.json"
    if (ended := read_outcome(outcome_path)) is not None:
        # It ended before the driver died, but after Tune last saved its state: report the
        # recorded end instead of training again.
        ray.tune.report({**final_result(ended), "recorded": 1})
        return

    records = process_queue(sdir / SPOOL)
    key = trial_key(ctx, trial_id)
    name, params, tags = trial_run(ctx, trial_id, flat, sampled, seed, source)
    records.ensure(key, name, params, tags)
    records.put(key, "status", status="RUNNING")
    records.tags(key, {"state": STATE_RUNNING, "driver_node": ray.get_runtime_context().get_node_id()})

    def fail(reason: str) -> None:
        write_outcome(outcome_path, STATE_FAILED, error=reason)
        records.terminate(key, "FAILED", {"state": STATE_FAILED, "error": reason[:4000]})
        records.close(who=f"trial {trial_id}")
        ray.tune.report({"trial_error": 1, "error": reason})

    if invalid is not None:  # each sampled value valid, not together (a crop scale range min > max)
        fail(f"invalid configuration: {invalid}")
        return
    if ctx.budget.gpus_per_worker and flat["train.device"] == "auto":
        flat = {**flat, "train.device": "cuda"}
    loop_config = {
        "flat": flat,
        "run_key": key.as_dict(),
        "spool": str(sdir / SPOOL),
        "probe": True,
        "quiet": True,
    }
    try:
        final = (
            train_in_actor(loop_config)
            if ctx.launcher == "tune"
            else train_as_job(loop_config, ctx, trial_id)
        )
    except SystemExit:  # ASHA stopped it (the driver records that): what is queued, sent or spooled
        records.close(timeout=min(flush_seconds(), 10.0), who=f"trial {trial_id}")
        raise
    except Exception as exc:
        from amdim.harness.ray_train import failed_job

        reason, repeats = failed_job(exc)
        if not repeats:
            records.wait(5.0)  # a short head start for the record; Tune restarts the trial
            raise
        fail(reason)
        return
    # The trial's own last report told Tune and Optuna how it ended (a diverged Train job's
    # rank 0 too, through TuneReportCallback); here: the study folder's record, and MLflow's.
    state = STATE_DIVERGED if final.get("diverged") else STATE_COMPLETE
    write_outcome(outcome_path, state, final)
    records.metrics(key, {"trial_wall_s": time.time() - t0}, step=int(flat["train.epochs"]))
    records.terminate(key, "FAILED" if state == STATE_DIVERGED else "FINISHED", {"state": state})
    records.close(who=f"trial {trial_id}")


def final_result(ended: dict[str, Any]) -> dict[str, Any]:
    """The last result a trial reports for a recorded end (:func:`amdim.harness.trial.write_outcome`)."""
    if ended["state"] == STATE_FAILED:
        return {"trial_error": 1, "error": ended.get("error", "")}
    metrics = dict(ended.get("metrics", {}))
    if ended["state"] == STATE_DIVERGED:
        return {**metrics, "diverged": 1}
    return metrics


def train_in_actor(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The Tune path: the trainer in this actor, reporting through ``ray.tune``. Ray gave the
    actor the trial's CPUs (torch threads follow them, rounded) and its GPU share (the one visible
    device); a restarted trial continues from ``ray.tune.get_checkpoint()``."""
    import ray
    import ray.tune
    import torch

    from amdim.harness.trial import train_and_report, worker_threads

    threads = worker_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
    torch.set_num_threads(threads)
    device = torch.device("cuda" if from_flat(loop_config["flat"]).train.device == "cuda" else "cpu")
    return train_and_report(
        loop_config,
        session=ray.tune,
        device=device,
        tags={"worker_node": ray.get_runtime_context().get_node_id(), "torch_threads": str(threads)},
    )


def train_as_job(loop_config: dict[str, Any], ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    """The Train path: a Ray Train job whose rank-0 worker reports to this trial through
    ``TuneReportCallback``; its deterministic name makes a restarted trial resume its own run.
    Ray Train itself does not retry a failed worker group (only a preempted node): Tune restarts
    the trial, so that one error is never retried by both. Returns rank 0's last report."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from amdim.harness.ray_train import worker_loop

    b = ctx.budget
    resources = {
        **dict(b.worker_resources),
        "CPU": b.cpus_per_worker,
        **({"GPU": b.gpus_per_worker} if b.gpus_per_worker else {}),
    }
    result = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=b.workers, use_gpu=bool(b.gpus_per_worker), resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if b.gpus_per_worker and b.workers > 1 else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{ctx.stage}-{trial_id}",
            storage_path=ctx.train_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
            callbacks=[TuneReportCallback()],
        ),
    ).fit()
    return dict(result.return_value or {})
