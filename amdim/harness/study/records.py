"""A study's MLflow record: the states a trial ends in, the parent run, and each trial's child run.

One MLflow experiment per study, one parent run in it, one child run per trial nested under it
(``mlflow.parentRunId``), with every key of the trial's flat config as a parameter (the sampled
keys hold exactly the values Optuna chose) and a ``state`` tag (:data:`STATES`). A child is found
again by its ``tune_trial_id`` tag, so a resumed study never duplicates one. Trials and the
driver write through their tracking queues (:mod:`amdim.harness.tracking_queue`): the record
follows the search, and never holds it up.
"""

from __future__ import annotations

from typing import Any

from amdim.config import to_flat
from amdim.harness import tracking
from amdim.harness.study import layout
from amdim.harness.study.context import TrialContext
from amdim.harness.study_spec import StudySpec, config_id
from amdim.harness.tracking_queue import RunKey

STATE_COMPLETE, STATE_EARLY, STATE_FAILED, STATE_RUNNING = "complete", "early_stopped", "failed", "running"
STATE_DIVERGED = "diverged"  # the loss stopped being finite: MLflow FAILED, Optuna FAIL
STATE_INTERRUPTED = "interrupted"  # Ctrl-C stopped it: MLflow KILLED, Optuna RUNNING until resumed
STATES = (STATE_COMPLETE, STATE_EARLY, STATE_DIVERGED, STATE_FAILED, STATE_RUNNING, STATE_INTERRUPTED)


def parent_run(spec: StudySpec, uri: str, log) -> str:
    """The study's MLflow parent run: created once (with the spec as an artifact and its search
    settings as parameters), found again on resume through ``state.json``."""
    import mlflow

    record = layout.state(spec.name)
    if "parent_run_id" in record:
        mlflow.MlflowClient(uri).update_run(record["parent_run_id"], status="RUNNING")
        return record["parent_run_id"]
    flat = to_flat(spec.base)
    tags = tracking.run_tags(flat, "study", {"kind": "study", "study": spec.name, "stage": "study",
                                             "spec_fingerprint": spec.fingerprint()})  # fmt: skip
    run = tracking.RunRecord.create(uri, spec.name, f"study-{spec.name}", {}, tags)
    b = spec.budget
    params = {
        "study.sampler": f"{spec.sampler.type} (seed {spec.sampler.seed}, {spec.sampler.n_startup_trials} startup)",
        "study.scheduler": spec.scheduler.type
        + (f" (grace {spec.scheduler.grace_period}, rf {spec.scheduler.reduction_factor})"
           if spec.scheduler.type == "asha" else ""),
        "study.trials": b.trials,
        "study.epochs": b.epochs,
        "study.objective.online": spec.online_metric,
        "study.objective.rank": spec.rank_metric,
        "study.searched": ",".join(spec.keys),
        "study.resources": f"{b.workers} workers x ({b.cpus_per_worker:g} CPU, {b.gpus_per_worker:g} GPU)",
    }  # fmt: skip
    client = mlflow.MlflowClient(uri)
    for k, v in params.items():
        client.log_param(run.run_id, k, str(v))
    run.log_dict(spec.source, "spec.json")
    layout.write_json(
        layout.study_dir(spec.name) / "state.json",
        {**record, "parent_run_id": run.run_id, "experiment": spec.name, "tracking_uri": uri},
    )
    log(f"MLflow: experiment '{spec.name}', parent run {run.run_id}")
    return run.run_id


def trial_key(ctx: TrialContext, tune_trial_id: str) -> RunKey:
    """The MLflow run of a study trial, as the tracking queue finds (or creates) it."""
    return RunKey(
        ctx.tracking_uri, experiment=ctx.experiment, parent=ctx.parent_run_id, tune_trial_id=tune_trial_id
    )


def trial_run(
    ctx: TrialContext,
    trial_id: str,
    flat: dict[str, Any],
    sampled: dict[str, Any],
    seed: int | None,
    source: Any,
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The name, parameters and tags a trial's MLflow run is created with."""
    b = ctx.budget
    device = f"{b.workers}x " + (f"{b.gpus_per_worker:g} GPU" if b.gpus_per_worker else "CPU (gloo)")
    tags = tracking.run_tags(flat, device, {"launcher": f"ray-tune ({ctx.launcher} path)"})
    tags.update(
        {
            "study": ctx.study,
            "stage": ctx.stage,
            "config_id": config_id(sampled),
            "sampled_keys": ",".join(ctx.keys),
            "seed": str(flat["train.seed"]),
            "setting": ctx.label(sampled),
            "trial_path": ctx.launcher,
            **({"confirm_of": str(source)} if source is not None else {}),
        }
    )
    name = f"{ctx.stage}-{trial_id}" + (f"-seed{flat['train.seed']}" if seed is not None else "")
    return name, flat, tags


def study_runs(name: str, uri: str | None = None) -> tuple[Any, str | None, list[Any]]:
    """``(client, parent run id, child runs)`` of a study, found through its ``state.json``;
    ``(client, None, [])`` before its parent run exists or when the store does not hold it."""
    import mlflow

    client = mlflow.MlflowClient(uri or tracking.tracking_uri())
    record = layout.state(name)
    if "parent_run_id" not in record:
        return client, None, []
    exp = client.get_experiment_by_name(record["experiment"])
    if exp is None:
        return client, None, []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record['parent_run_id']}'",
        max_results=50000,
    )
    return client, record["parent_run_id"], list(runs)
