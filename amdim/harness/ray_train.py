"""Ray Train path of ``amdim train``: a TorchTrainer over N workers, tracked in MLflow.

Ray 2.60 runs Train V2 by default: ``TorchTrainer(...).fit()`` starts a controller and a worker
group with its own placement group; each worker runs :func:`worker_loop`, which is the project's
ordinary trainer (:func:`amdim.trainer.fit`) with the model wrapped in DDP, the NCE targets
all-gathered so the negatives are the global batch, metrics all-reduced, and a checkpoint reported
to Ray after every epoch. A worker that dies is replaced (``FailureConfig(max_failures)``) and the
group resumes from the last reported checkpoint; re-running with the same ``--out`` resumes too,
because the Train run's storage path and name are deterministic.

The MLflow run is created by the driver (parameters, tags, config artifact), filled per epoch by the
rank-0 worker only, and closed by the driver after the offline linear probe. This module imports
Ray at module level; the core (``amdim.trainer`` and below) never does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from amdim.config import Config, from_flat, to_flat, with_overrides
from amdim.errors import DivergedError, UserError

RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # 2.60 enables token auth and writes ~/.ray/auth_token otherwise
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # default 2 s: shortens every run's tail
    # Study trials report the ranking metric (the offline probe) only in their last result.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0 the legacy reporter prints nothing; studies print their own lines
    # A reused trial actor waits this long for the previous trial's thread to end (default 2 s;
    # a thread still alive then fails the next trial). ASHA's stop ends it at once, inside its report.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",
    # Tune sets this (Lightning's fork guard) in every trial actor's runtime env; set before Ray
    # starts, the actors inherit it, and a study leaves that runtime env out (study.py,
    # _trial_actors_inherit_env) so that Ray can run them in the workers it prestarted.
    "PL_DISABLE_FORK": "1",
    # Tune adds CSV, JSON and TensorBoard loggers to every experiment unless told not to; the
    # TensorBoard one imports tensorboardX, which imports torch in the driver: about 2 s on 2 cores,
    # serial, before the first trial starts (docs/benchmarks.md). Studies add the CSV and JSON ones
    # themselves (study.py, _tuner); their record is MLflow.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def set_ray_env() -> None:
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def other_local_ray() -> list[str]:
    """GCS addresses of Ray instances already running on this machine that ``ray.init()`` would not
    join (started by another process's ``ray.init``, not by ``ray start``). Empty when there are none,
    or when a ``ray start`` cluster exists (``ray.init()`` joins that one)."""
    try:
        from ray._private import services

        if services.find_bootstrap_address(None) is not None:
            return []
        services.find_gcs_addresses.cache_clear()
        return sorted(services.find_gcs_addresses())
    except Exception:  # a Ray without these helpers: no check, Ray's own behaviour
        return []


def init_ray(**kwargs: Any) -> bool:
    """``ray.init`` (joining ``RAY_ADDRESS`` when set) unless this process is connected already;
    returns whether it called it (and so should shut Ray down).

    Two local Ray instances on one machine break Ray Train (its helper processes find both and
    refuse to choose), so a second local start is refused in one line while another instance runs.
    An instance that is shutting down (e.g. just after a killed study) gets
    ``AMDIM_RAY_WAIT_S`` (default 20) seconds to go away first.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        deadline = time.monotonic() + float(os.environ.get("AMDIM_RAY_WAIT_S", "20"))
        while (others := other_local_ray()) and time.monotonic() < deadline:
            time.sleep(1.0)
        if others:
            raise UserError(
                f"another local Ray instance is running on this machine (GCS {others[0]}; another study or "
                "`amdim train`?), and two break Ray Train: wait for it to finish (`ray stop` ends a leftover "
                "one), or start one shared instance with `ray start --head` and run with RAY_ADDRESS=auto"
            )
    ray.init(address=address, **kwargs)
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` of a Ray this process started, without the second it loses on the autoscaler
    monitor: Ray stops the monitor after the GCS, and the monitor's SIGTERM handler then tries to
    report its end to the stopped GCS until Ray kills it a second later (measured in
    docs/benchmarks.md). A Ray that ``ray.init`` started here has no autoscaling config, so its
    monitor holds nothing to save and is killed first. Any Ray without these internals: the plain
    shutdown."""
    import ray

    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node else []
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # a shortcut only: ray.shutdown below does the work
        pass
    ray.shutdown()


def check_resources(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    """One-line errors, before Ray starts, for requests this machine or cluster cannot meet."""
    import torch

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise UserError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if gpus_per_worker and workers > 1 and gpus_per_worker < 1:
        raise UserError(
            f"--gpus-per-worker {gpus_per_worker} with {workers} workers would put two DDP ranks on one GPU, "
            "which NCCL refuses; use whole GPUs, or fractional GPUs with --workers 1"
        )
    remote = bool(os.environ.get("RAY_ADDRESS"))
    if remote:
        return  # checked against the cluster's resources once connected (see _check_cluster)
    if gpus_per_worker and not torch.cuda.is_available():
        raise UserError(f"--gpus-per-worker {gpus_per_worker} requested, but this machine has no CUDA GPU")
    if gpus_per_worker and workers * gpus_per_worker > torch.cuda.device_count():
        raise UserError(
            f"{workers} workers x {gpus_per_worker} GPUs need {workers * gpus_per_worker:g} GPUs; "
            f"this machine has {torch.cuda.device_count()}"
        )
    cpus = os.cpu_count() or 1
    if workers * cpus_per_worker > cpus:
        raise UserError(
            f"{workers} workers x {cpus_per_worker:g} CPUs need {workers * cpus_per_worker:g} CPUs; "
            f"this machine has {cpus} (lower --workers or --cpus-per-worker)"
        )


def _check_cluster(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    import ray

    res = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    for key, amount in need.items():
        if amount and res.get(key, 0) < amount:
            raise UserError(f"the Ray cluster has {res.get(key, 0):g} {key}s; this run needs {amount:g}")


def last_error_line(text: str) -> str | None:
    """The last 'SomeError: message' line of a Ray error's text (its own first line is generic)."""
    causes = [
        ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Interrupt)\b:?", ln)
    ]
    return causes[-1][:200] if causes else None


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the project's trainer as rank ``world_rank`` of the group (see
    :func:`amdim.harness.trial.train_and_report`), DDP-wrapped when there are several."""
    import ray.train
    import ray.train.torch
    import torch

    from amdim.distributed import wrap_ddp
    from amdim.harness.trial import registered_checkpoints, train_and_report, worker_threads

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = from_flat(loop_config["flat"]).train.device != "cpu"
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = worker_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
    torch.set_num_threads(threads)
    snapshot = ctx.get_storage().checkpoint_manager_snapshot_path

    train_and_report(
        loop_config,
        session=ray.train,
        rank=rank,
        world=world,
        device=device,
        wrap_model=lambda model: wrap_ddp(model, device),
        tags={"worker_node": ray.get_runtime_context().get_node_id(), "torch_threads": str(threads)},
        registered=lambda: registered_checkpoints(snapshot),
    )


def train_ray(
    cfg: Config,
    out: Path,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    experiment: str = "amdim",
    probe: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` on a Ray TorchTrainer, record it in MLflow, then run the offline probe.

    Leaves ``out/checkpoint.pt`` (final) and ``out/metrics.json`` like the local path, plus the Ray
    Train run under ``out/ray/``.
    """
    from amdim.config import absolute_spec, data_spec_problem
    from amdim.harness import tracking

    # Everything checkable is checked before anything is written under ``out``.
    check_resources(workers, gpus_per_worker, cpus_per_worker)
    if (problem := data_spec_problem(cfg.data.spec)) is not None:
        raise UserError(f"data.spec: {problem}")
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)

    cfg = with_overrides(
        cfg,
        {
            "data.spec": absolute_spec(cfg.data.spec),
            "train.device": "cuda" if gpus_per_worker else "cpu",
        },
    )
    if cfg.data.batch_size % workers:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is the global batch; it must divide by --workers {workers}"
        )
    set_ray_env()
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer

    out = out.resolve()
    flat = to_flat(cfg)
    t_init = time.perf_counter()
    started_ray = init_ray(log_to_driver=True, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t_init
    record = None
    try:
        _check_cluster(workers, gpus_per_worker, cpus_per_worker)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
        device_tag = f"{workers}x " + (
            f"{gpus_per_worker:g} GPU ({torch.cuda.get_device_name(0)})" if gpus_per_worker else "CPU (gloo)"
        )
        record = tracking.RunRecord.create(
            uri, experiment, out.name, flat, tracking.run_tags(flat, device_tag, {"launcher": "ray-train"})
        )
        record.log_artifact(out / "config.json")
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer_ = TorchTrainer(
            worker_loop,
            train_loop_config={"flat": flat, "tracking_uri": uri, "run_id": record.run_id},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=bool(gpus_per_worker), resources_per_worker=resources
            ),
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            run_config=ray.train.RunConfig(
                name="train",
                storage_path=str(out / "ray"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=3),
            ),
        )
        t_fit = time.perf_counter()
        try:
            result = trainer_.fit()
        except ray.train.TrainingFailedError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"training failed after {max_failures} worker restarts: {first}") from None
        fit_s = time.perf_counter() - t_fit
        # The workers stopped on a non-finite loss: rank 0 said so on the run (the job's result
        # holds the last checkpointed report, an earlier good epoch, never the diverged one).
        if (where := record.divergence()) is not None:
            from amdim.harness.local import leave_no_result

            exc = DivergedError(*where)
            leave_no_result(out, exc)  # as on the local path
            raise exc
        if result.checkpoint is None:
            raise UserError("training produced no checkpoint")
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / "checkpoint.pt", out / "checkpoint.pt")
        record.set_tags({"checkpoint_path": str(out / "checkpoint.pt")})
        summary = _finish(cfg, out, record, probe)
        summary.update(
            {"ray_init_s": ray_init_s, "fit_s": fit_s, "run_id": record.run_id, "tracking_uri": uri}
        )
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        record.finish("FINISHED")
        return summary
    except BaseException:
        if record is not None:
            record.finish("FAILED")
        raise
    finally:
        if started_ray:
            shutdown_ray()


def _finish(cfg: Config, out: Path, record, probe: bool) -> dict[str, Any]:
    """Driver side after training: offline probe, segmentation PNG, artifacts."""
    import torch

    from amdim import checkpoint as ckpt_io
    from amdim import data as data_mod
    from amdim import trainer
    from amdim.evaluate import final_evaluation

    payload = ckpt_io.load(out / "checkpoint.pt")
    summary: dict[str, Any] = {
        "config": payload["config"],
        "epochs": int(payload["epoch"]),
        "history": payload.get("history", []),
        "checkpoint": str(out / "checkpoint.pt"),
    }
    if not probe and cfg.loss.n_mix == 1:
        return summary
    model, cfg = trainer.model_from_checkpoint(payload, "cpu")
    bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    final = final_evaluation(
        model, cfg, bundle, torch.device("cpu"), epoch=summary["epochs"], probe=probe,
        segmentation=out / "segmentation.png",
    )  # fmt: skip
    if "probe" in final:
        record.log_probe(final["probe"])
        summary["probe"] = final["probe"]
    if "segmentation" in final:
        record.log_artifact(final["segmentation"])
    return summary
