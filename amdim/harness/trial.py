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
) -> str:
    """Train ``loop_config["flat"]``, reporting every epoch to ``session`` (``ray.tune`` or
    ``ray.train``) and to the MLflow run ``loop_config["run_id"]``; with ``loop_config["probe"]``,
    run the offline probe on rank 0 afterwards and report its result last.

    Returns ``"complete"``, or ``"diverged"`` when the loss stopped being finite: then the last
    report is ``{"diverged": 1, "diverged_at_epoch": E, "diverged_at_step": S}`` and there is no
    probe. The first report after a (re)start carries ``first_step_at`` (wall-clock time of the end of the
    first optimiser step in this process), from which the study driver measures a trial's start-up.
    """
    from amdim import trainer
    from amdim.harness.tracking import RunRecord, system_metrics

    cfg = from_flat(loop_config["flat"])
    bundle = _dataset(cfg.data.spec, cfg.model.image_size)
    payload = None
    if (checkpoint := session.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            payload = ckpt_io.load(Path(d) / "checkpoint.pt")
    start_epoch = int(payload["epoch"]) if payload else 0
    record = RunRecord(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if record is not None:
        record.set_tags(tags or {})
        if payload is not None:  # a restarted process: say where it picked up, even if no epoch is left
            record.log_metrics({"restarted_at_epoch": start_epoch}, step=start_epoch)

    first_step: list[float] = []  # when this process's first optimiser step ended
    sent_first_step: list[bool] = []

    def on_step(state, i: int) -> None:
        if not first_step:
            first_step.append(time.time())
        if os.environ.get(FAULT_ENV):
            _maybe_inject_fault(state.epoch, i, rank, registered)

    def report(metrics: dict[str, float], make_payload) -> None:
        metrics = {**metrics, "resumed_from_epoch": start_epoch, "workers": world}
        if record is not None:
            record.log_metrics(metrics, step=int(metrics["epoch"]))
        if first_step and not sent_first_step:  # once per (re)start: the driver's start-up figure
            metrics["first_step_at"] = first_step[0]
            sent_first_step.append(True)
        with tempfile.TemporaryDirectory() as d:
            ck = None
            if rank == 0:
                ckpt_io.save(Path(d) / "checkpoint.pt", make_payload())
                ck = session.Checkpoint.from_directory(d)
            session.report(metrics, checkpoint=ck)  # persists the checkpoint before it returns

    monitor = (
        system_metrics(record.uri, record.run_id, cfg.train.system_metrics_s)
        if record is not None
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
        if record is not None:
            record.mark_diverged(exc.epoch, exc.step)
        session.report({"diverged": 1, "diverged_at_epoch": exc.epoch, "diverged_at_step": exc.step})
        return "diverged"
    if state.epoch == 0:  # --epochs 0: report the randomly initialised model as the result
        report({"epoch": 0}, lambda: trainer.checkpoint_payload(cfg, state, bundle.n_classes))
    if loop_config.get("probe"):
        _probe_and_report(cfg, state, bundle, record, rank, device, session)
    return "complete"


def _probe_and_report(cfg: Config, state, bundle, record, rank: int, device: torch.device, session) -> None:
    """The offline probe on rank 0's device right after training; its result goes out as one last
    report (epoch unchanged) so that Tune and Optuna see it."""
    from amdim.evaluate import final_evaluation

    final = {
        k: v for k, v in (state.history[-1] if state.history else {}).items() if isinstance(v, (int, float))
    }
    final["epoch"] = state.epoch
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            result = final_evaluation(
                state.core, cfg, bundle, device, epoch=state.epoch,
                segmentation=Path(d) / "segmentation.png",
            )  # fmt: skip
            if "segmentation" in result:
                record.log_artifact(result["segmentation"])
        probe = result["probe"]
        record.log_probe(probe)
        record.log_metrics({"probe_time_s": probe["time_s"]}, step=state.epoch)
        final.update({f"probe_{k}": probe[k] for k in ("test_accuracy", "val_accuracy", "train_accuracy")})
        final["probe_time_s"] = probe["time_s"]
    session.report(final)  # on a Train worker every rank calls it (a barrier); Tune reads rank 0's
