"""The body of one training process under Ray: a study trial in its own Tune actor, or one rank
of a Ray Train worker group.

Both run the project's trainer (:func:`amdim.trainer.fit`) the same way and differ only in the Ray
API they report through, passed in as ``session``: ``ray.tune`` inside a Tune trial's actor
(single-worker study trials, no Train job), ``ray.train`` on the workers of a Train job
(``amdim train`` without ``--local``, and study trials with several workers). Under Train V2 the
``ray.train`` session functions raise inside a Tune function and ``ray.tune.report`` is dropped on
a Train worker, so the caller passes the one that works where it runs. Both modules offer the same
three names this module uses: ``get_checkpoint``, ``report`` and ``Checkpoint``.

Every epoch's metrics go to the MLflow run (from rank 0) and to Ray with a checkpoint (every rank
calls ``report``: on a Train worker it is a barrier); a restarted process continues from
``session.get_checkpoint()``. ASHA stops a Tune trial by raising ``SystemExit`` inside ``report``,
so nothing after that report runs: the offline probe, which only trials that finish should pay
for, comes after the last epoch's report, and so does nothing that must always happen.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amdim import checkpoint as ckpt_io
from amdim.config import Config, from_flat
from amdim.errors import DivergedError

FAULT_ENV = "AMDIM_FAULT_INJECT"  # "EPOCH:RANK:MARKER": SIGKILL that rank once, mid-way through epoch EPOCH+1


def worker_threads(assigned_cpus: float | None) -> int:
    """torch threads for a process holding ``assigned_cpus`` CPUs.

    Ray sets ``OMP_NUM_THREADS`` to the floor of a worker's CPUs, so a 1.75-CPU worker would run
    one thread on two cores. Round instead: 1.75 -> 2, 0.75 -> 1, at least 1.
    """
    if not assigned_cpus:
        return max(1, torch.get_num_threads())
    return max(1, int(assigned_cpus + 0.5))


def registered_checkpoints(snapshot: str | Path) -> int:
    """Checkpoints a Ray Train run has committed, read from its checkpoint-manager snapshot."""
    try:
        return len(json.loads(Path(snapshot).read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def _maybe_inject_fault(
    completed_epochs: int, step_in_epoch: int, rank: int, registered: Callable[[], int] | None
) -> None:
    """Test hook: kill this process for real, once, at the third step of the epoch after ``EPOCH``,
    once Ray has committed ``EPOCH`` checkpoints (``registered``, where Ray commits them apart from
    the report: a Train job's controller does it after the report returns)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at_epoch, at_rank, marker = spec.split(":", 2)
    if (completed_epochs, step_in_epoch, rank) != (int(at_epoch), 2, int(at_rank)) or os.path.exists(marker):
        return
    deadline = time.monotonic() + 60
    while registered is not None and registered() < int(at_epoch) and time.monotonic() < deadline:
        time.sleep(0.1)
    Path(marker).write_text(f"killed rank {rank} in epoch {completed_epochs + 1} at {time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=1)
def _dataset(spec: str, image_size: int):
    """The dataset, loaded once per process: a reused trial actor (the Tune path) trains trial
    after trial on the same data. Nothing downstream modifies a loaded bundle."""
    from amdim import data as data_mod

    return data_mod.load_data(spec, image_size)


def write_outcome(
    path: str | Path | None, state: str, metrics: dict[str, Any] | None = None, **extra: Any
) -> None:
    """The trial's end, in the study folder (``trials/<stage>-<trial>.json``): what a restarted
    trial reports instead of training again when Tune had not yet recorded that it ended (the
    driver died between the two), and how a Train-path trial learns its workers' outcome."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"state": state, "metrics": metrics or {}, **extra}, default=str) + "\n")
    tmp.replace(path)


def read_outcome(path: str | Path | None) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def train_and_report(
    loop_config: dict[str, Any],
    *,
    session: Any,
    rank: int = 0,
    world: int = 1,
    device: torch.device,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    tags: dict[str, str] | None = None,
    registered: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Train ``loop_config["flat"]``, reporting every epoch to ``session`` (``ray.tune`` or
    ``ray.train``) and, from rank 0, to the MLflow run ``loop_config["run_key"]`` through this
    process's tracking queue (training never waits for the tracking server); with
    ``loop_config["probe"]``, run the final evaluation (the offline probe, the segmentation of a
    mixture model) on rank 0's own device afterwards, and report its result last, with the final
    checkpoint and the evaluation's files (``probe.json``, ``segmentation.png``) beside it.

    Returns the last report's metrics (a Train job's rank 0 hands them to its driver as the
    result's ``return_value``). When the loss stopped being finite that report is
    ``{"diverged": 1, "diverged_at_epoch": E, "diverged_at_step": S}``, without a checkpoint or a
    probe. The first report after a (re)start carries ``first_step_at`` (wall-clock time of
    the end of the first optimiser step in this process), from which the study driver measures a
    trial's start-up.
    """
    from amdim import trainer
    from amdim.harness.tracking import system_metrics
    from amdim.harness.tracking_queue import RunKey, process_queue

    cfg = from_flat(loop_config["flat"])
    bundle = _dataset(cfg.data.spec, cfg.model.image_size)
    payload = None
    if (checkpoint := session.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            payload = ckpt_io.load(Path(d) / "checkpoint.pt")
    start_epoch = int(payload["epoch"]) if payload else 0
    key = RunKey(**loop_config["run_key"]) if rank == 0 else None
    records = process_queue(Path(loop_config["spool"]) if loop_config.get("spool") else None)
    if key is not None:
        records.tags(key, tags or {})
        if payload is not None:  # a restarted process: say where it picked up, even if no epoch is left
            records.metrics(key, {"restarted_at_epoch": start_epoch}, step=start_epoch)

    first_step: list[float] = []  # when this process's first optimiser step ended
    sent_first_step: list[bool] = []

    def on_step(state, i: int) -> None:
        if not first_step:
            first_step.append(time.time())
        if os.environ.get(FAULT_ENV):
            _maybe_inject_fault(state.epoch, i, rank, registered)

    def report(metrics: dict[str, float], make_payload) -> None:
        metrics = {**metrics, "resumed_from_epoch": start_epoch, "workers": world}
        if key is not None:
            records.metrics(key, metrics, step=int(metrics["epoch"]))
        if first_step and not sent_first_step:  # once per (re)start: the driver's start-up figure
            metrics["first_step_at"] = first_step[0]
            sent_first_step.append(True)
        with tempfile.TemporaryDirectory() as d:
            ck = None
            if rank == 0:
                ckpt_io.save(Path(d) / "checkpoint.pt", make_payload())
                ck = session.Checkpoint.from_directory(d)
            session.report(metrics, checkpoint=ck)  # persists the checkpoint before it returns

    # MLflow's system-metrics monitor logs to a run id from its own thread: it starts once the
    # tracking queue has the run (at once, or when the server answers again), never delaying
    # training, and its last sample is not waited for long.
    monitor = (
        system_metrics(
            key.uri,
            lambda: records.resolved(key, timeout=24 * 3600),
            cfg.train.system_metrics_s,
            finish_within=5.0,
        )
        if key is not None
        else contextlib.nullcontext()
    )
    try:
        with monitor:  # ASHA's SystemExit inside a report passes through it too: the monitor stops
            state = trainer.fit(
                cfg,
                bundle=bundle,
                resume=payload,
                dist=trainer.DistContext(rank, world),
                wrap_model=wrap_model,
                on_epoch_end=report,
                log=print if rank == 0 and not loop_config.get("quiet") else None,
                device=device,
                on_step=on_step,
            )
    except DivergedError as exc:
        # Deterministic: a restart would diverge again. The run says so, and the last report
        # (no checkpoint, no probe) tells Tune and Optuna that this trial failed for this reason.
        final = {"diverged": 1, "diverged_at_epoch": exc.epoch, "diverged_at_step": exc.step}
        if key is not None:
            records.tags(key, {"state": "diverged", "diverged_at": f"epoch {exc.epoch} step {exc.step}",
                               "diverged_at_epoch": exc.epoch, "diverged_at_step": exc.step})  # fmt: skip
        session.report(final)
        return final
    if state.epoch == 0:  # --epochs 0: report the randomly initialised model as the result
        report({"epoch": 0}, lambda: trainer.checkpoint_payload(cfg, state, bundle.n_classes))
    final = {
        k: v for k, v in (state.history[-1] if state.history else {}).items() if isinstance(v, (int, float))
    }
    final["epoch"] = state.epoch
    probe = bool(loop_config.get("probe"))
    if not probe and cfg.loss.n_mix == 1:
        return final
    with tempfile.TemporaryDirectory() as d:
        ck = None
        if rank == 0:
            final.update(_final_evaluation(cfg, state, bundle, device, Path(d), key, records, probe))
            ckpt_io.save(Path(d) / "checkpoint.pt", trainer.checkpoint_payload(cfg, state, bundle.n_classes))
            ck = session.Checkpoint.from_directory(d)
        # On a Train worker every rank reports (a barrier); Tune and Train read rank 0's.
        session.report(final, checkpoint=ck)
    return final


def _final_evaluation(
    cfg: Config, state, bundle, device: torch.device, folder: Path, key, records, probe: bool
) -> dict[str, Any]:
    """Rank 0, right after training, on its own device: the offline probe and, for a mixture model,
    the segmentation PNG, written into ``folder`` (the final checkpoint's) and recorded on the run."""
    from amdim.evaluate import final_evaluation

    result = final_evaluation(
        state.core,
        cfg,
        bundle,
        device,
        epoch=state.epoch,
        probe=probe,
        segmentation=folder / "segmentation.png",
    )
    if key is not None and "segmentation" in result:
        records.artifact(key, "segmentation.png", Path(result["segmentation"]).read_bytes())
    if not probe:
        return {}
    probe_result = result["probe"]
    (folder / "probe.json").write_text(json.dumps(probe_result, indent=2, default=str) + "\n")
    ran_on = f"rank 0 worker, pid {os.getpid()}, {device.type}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    )
    if key is not None:
        keys = ("test_accuracy", "val_accuracy", "train_accuracy", "lr", "weight_decay")
        step = int(probe_result.get("epoch", 0))
        records.metrics(key, {f"probe_{k}": probe_result[k] for k in keys if k in probe_result}, step=step)
        records.metrics(key, {"probe_time_s": probe_result["time_s"]}, step=step)
        records.tags(key, {"probe_protocol": probe_result["protocol"], "probe_ran_on": ran_on})
        records.json_artifact(key, "probe.json", probe_result)
    out = {f"probe_{k}": probe_result[k] for k in ("test_accuracy", "val_accuracy", "train_accuracy")}
    out["probe_time_s"] = probe_result["time_s"]
    return out
