"""Ray Train path of ``amdim train``: a TorchTrainer over N workers, tracked in MLflow.

Ray 2.60 runs Train V2 by default: ``TorchTrainer(...).fit()`` starts a controller and a worker
group with its own placement group; each worker runs :func:`worker_loop`, which is the project's
ordinary trainer (:func:`amdim.trainer.fit`) with the model wrapped in DDP, the NCE targets
all-gathered so the negatives are the global batch, metrics all-reduced, and a checkpoint reported
to Ray after every epoch. A worker group that fails is started again from the last reported
checkpoint (up to ``--max-failures`` times) unless a retry would repeat the failure; re-running with
the same ``--out`` resumes too, because the Train run's storage path and name are deterministic.

The MLflow run is created by the driver (parameters, tags, config artifact), filled per epoch by the
rank-0 worker only (through its tracking queue: training never waits for the server), which also
runs the final evaluation on its own device; the driver closes the run. The driver itself never
touches a GPU, so it may run on a CPU-only head. This module imports Ray only where it runs it;
the core (``amdim.trainer`` and below) never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from amdim import checkpoint as ckpt_io
from amdim.config import Config, absolute_spec, from_flat, to_flat, with_overrides
from amdim.errors import DivergedError, UserError


def check_request(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    """One-line errors for a request that no cluster could serve as asked."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise UserError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if gpus_per_worker and workers > 1 and gpus_per_worker < 1:
        raise UserError(
            f"--gpus-per-worker {gpus_per_worker} with {workers} workers would put two DDP ranks on one GPU, "
            "which NCCL refuses; use whole GPUs, or fractional GPUs with --workers 1"
        )


def check_fits(workers: int, gpus_per_worker: float, cpus_per_worker: float, nodes, where: str) -> None:
    """One line when the workers never fit ``nodes`` (:class:`amdim.harness.raycluster.NodeType`:
    this machine, a cluster as it is, or every node its autoscaler may add), each on one node."""
    from amdim.harness.raycluster import fits, slots

    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    largest = {k: max((t.resources.get(k, 0.0) for t in nodes), default=0.0) for k in bundle}
    if gpus_per_worker and not largest["GPU"]:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g} requested, but {where} has no CUDA GPU")
    for key, flag in (("GPU", "--gpus-per-worker"), ("CPU", "--cpus-per-worker")):
        if key in bundle and bundle[key] > largest[key] + 1e-9:
            raise UserError(
                f"{flag} {bundle[key]:g}: no node of {where} has more than {largest[key]:g} {key}s"
            )
    if any(fits(bundle, t.resources) for t in nodes) and slots(bundle, nodes) < workers:
        total = {k: sum(t.count * t.resources.get(k, 0.0) for t in nodes) for k in bundle}
        need = ", ".join(f"{workers * v:g} {k}s" for k, v in bundle.items())
        have = ", ".join(f"{v:g} {k}s" for k, v in total.items())
        raise UserError(
            f"{workers} workers x ({', '.join(f'{v:g} {k}' for k, v in bundle.items())}) need {need}; "
            f"{where} has {have} (lower --workers or --cpus-per-worker)"
        )


def last_error_line(text: str) -> str | None:
    """The last 'SomeError: message' line of a Ray error's text (its own first line is generic)."""
    causes = [
        ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Interrupt)\b:?", ln)
    ]
    return causes[-1][:200] if causes else None


def worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the project's trainer as rank ``world_rank`` of the group (see
    :func:`amdim.harness.trial.train_and_report`), DDP-wrapped when there are several. Returns
    its last report: on rank 0 the driver reads it as the result's ``return_value``."""
    import ray.train
    import ray.train.torch
    import torch

    from amdim.distributed import wrap_ddp
    from amdim.harness.trial import FAULT_ENV, registered_checkpoints, train_and_report, worker_threads

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = from_flat(loop_config["flat"]).train.device != "cpu"
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    tags = {"worker_node": ray.get_runtime_context().get_node_id()}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tags["gpu"] = torch.cuda.get_device_name(device)
    threads = worker_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
    torch.set_num_threads(threads)
    tags["torch_threads"] = str(threads)
    registered = None
    if os.environ.get(FAULT_ENV):  # the fault injection test waits for Train to commit a checkpoint
        snapshot = ctx.get_storage().checkpoint_manager_snapshot_path
        registered = lambda: registered_checkpoints(snapshot)  # noqa: E731
    return train_and_report(
        loop_config,
        session=ray.train,
        rank=rank,
        world=world,
        device=device,
        wrap_model=lambda model: wrap_ddp(model, device),
        tags=tags,
        registered=registered,
    )


def failed_job(exc: BaseException) -> tuple[str, bool]:
    """One line for a failure of training (a Ray Train job's, through its workers' exceptions, or
    any other), and whether a retry would repeat it (a data or configuration error, out of
    memory) rather than maybe pass (a process that died)."""
    from amdim.errors import repeats_on_retry

    causes = list(getattr(exc, "worker_failures", {}).values()) or [getattr(exc, "controller_failure", exc)]
    for cause in causes:
        if (reason := repeats_on_retry(cause)) is not None:
            return reason, True
    text = str(causes[0]).strip().splitlines()
    return (last_error_line(str(causes[0])) or (text[0][:200] if text else type(causes[0]).__name__)), False


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
    """Train ``cfg`` on a Ray TorchTrainer, recorded in MLflow, with the final evaluation (the
    offline probe, the segmentation of a mixture model) on rank 0's own device.

    Leaves ``out/checkpoint.pt`` (final) and ``out/metrics.json`` like the local path, plus the Ray
    Train run under ``out/ray/`` (on a cluster of several nodes ``out`` must be on storage every
    node sees, as Ray Train requires for its checkpoints). The driver touches no GPU: it may run
    on a CPU-only head. A worker group that fails is started again from the last checkpoint, up to
    ``max_failures`` times, unless the failure would repeat (a data or configuration error, out
    of memory): then the run ends at once with one line.
    """
    from amdim.dataindex import check_readable
    from amdim.harness import tracking
    from amdim.harness.raycluster import init_ray, joins_a_cluster, this_machine
    from amdim.harness.tracking_queue import RunKey, replay, spooled

    # Everything checkable is checked before anything is written under ``out``.
    check_request(workers, gpus_per_worker, cpus_per_worker)
    check_readable(cfg.data.spec)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    if not joins_a_cluster():
        check_fits(workers, gpus_per_worker, cpus_per_worker, this_machine(), "this machine")
    cfg = with_overrides(
        cfg,
        {"data.spec": absolute_spec(cfg.data.spec), "train.device": "cuda" if gpus_per_worker else "cpu"},
    )
    if cfg.data.batch_size % workers:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is the global batch; it must divide by --workers {workers}"
        )
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = out.resolve()
    flat = to_flat(cfg)
    t_init = time.perf_counter()
    started_ray = init_ray(log_to_driver=True, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t_init
    record = None
    try:
        nodes, where = _capacity(ray)
        check_fits(workers, gpus_per_worker, cpus_per_worker, nodes, where)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
        device_tag = f"{workers}x " + (f"{gpus_per_worker:g} GPU" if gpus_per_worker else "CPU (gloo)")
        record = tracking.RunRecord.create(
            uri, experiment, out.name, flat, tracking.run_tags(flat, device_tag, {"launcher": "ray-train"})
        )
        record.log_artifact(out / "config.json")
        spool = out / "tracking-spool"
        loop_config = {
            "flat": flat, "run_key": RunKey(uri, run_id=record.run_id).as_dict(), "spool": str(spool), "probe": probe,
        }  # fmt: skip
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}

        def job() -> TorchTrainer:
            # Ray Train retries nothing itself (but a preempted node): a new job of the same name
            # resumes the run from its last committed checkpoint.
            return TorchTrainer(
                worker_loop,
                train_loop_config=loop_config,
                scaling_config=ray.train.ScalingConfig(
                    num_workers=workers, use_gpu=bool(gpus_per_worker), resources_per_worker=resources
                ),
                torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
                run_config=ray.train.RunConfig(
                    name="train",
                    storage_path=str(out / "ray"),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                    failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
                ),
            )

        t_fit = time.perf_counter()
        restarts = 0
        while True:
            try:
                result = job().fit()
                break
            except ray.train.TrainingFailedError as exc:
                line, repeats = failed_job(exc)
                if repeats:
                    raise UserError(f"training failed: {line}") from None
                if restarts >= max_failures:
                    raise UserError(f"training failed after {max_failures} restarts: {line}") from None
                restarts += 1
                print(
                    f"amdim: the worker group failed ({line}); starting it again from the last checkpoint "
                    f"(restart {restarts} of at most {max_failures})",
                    file=sys.stderr,
                    flush=True,
                )
        fit_s = time.perf_counter() - t_fit
        final = dict(result.return_value or {})
        if final.get("diverged"):  # rank 0 recorded where on the run; the local path ends the same way
            from amdim.harness.local import leave_no_result

            exc = DivergedError(int(final["diverged_at_epoch"]), int(final["diverged_at_step"]))
            leave_no_result(out, exc)
            raise exc
        if result.checkpoint is None:
            raise UserError("training produced no checkpoint")
        with result.checkpoint.as_directory() as d:
            for name in ("checkpoint.pt", "segmentation.png"):
                if (Path(d) / name).is_file():
                    shutil.copyfile(Path(d) / name, out / name)
            probe_result = (
                json.loads((Path(d) / "probe.json").read_text())
                if (Path(d) / "probe.json").is_file()
                else None
            )
        record.set_tags({"checkpoint_path": str(out / "checkpoint.pt")})
        payload = ckpt_io.load(out / "checkpoint.pt")
        summary: dict[str, Any] = {
            "config": payload["config"],
            "epochs": int(payload["epoch"]),
            "history": payload.get("history", []),
            "checkpoint": str(out / "checkpoint.pt"),
            "ray_init_s": ray_init_s,
            "fit_s": fit_s,
            "run_id": record.run_id,
            "tracking_uri": uri,
            **({"probe": probe_result} if probe_result is not None else {}),
        }
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        replay(spool)  # the workers' records that the tracking server did not take in time
        if spooled(spool):
            print(f"amdim: MLflow records of this run are kept in {spool}: the tracking server did not answer",
                  file=sys.stderr)  # fmt: skip
        record.finish("FINISHED")
        return summary
    except DivergedError:
        if record is not None:
            record.finish("FAILED")
        raise
    except BaseException:
        if record is not None:
            with contextlib.suppress(Exception):  # the run's error matters more than its record
                record.finish("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _capacity(ray) -> tuple[list[Any], str]:
    """Every node an autoscaling cluster may add (its launcher config), else the live nodes."""
    from amdim.harness.raycluster import autoscaling_config_path, autoscaling_node_types, live_nodes

    path = autoscaling_config_path()
    if path is None:
        return live_nodes(ray), "the Ray cluster"
    return autoscaling_node_types(path), f"the autoscaling cluster ({path})"
