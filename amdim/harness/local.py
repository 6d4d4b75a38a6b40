"""``amdim train --local``: the trainer in this process, checkpointed to a folder, recorded in MLflow.

The layer between the command line and the torch-only core: it adds the run folder
(``checkpoint.pt`` after every epoch, ``config.json``, ``metrics.json``) and, when an experiment is
named, an MLflow run like a Ray run's (see :mod:`amdim.harness.tracking`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from amdim.errors import DivergedError, UserError


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (NaN as null)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")
    tmp.replace(path)


def leave_no_result(out: Path, exc: DivergedError) -> None:
    """A diverged run is not a result: no ``checkpoint.pt`` or ``metrics.json`` stays under ``out``
    to be mistaken for one, and ``diverged.json`` says where the loss stopped being finite."""
    (out / "checkpoint.pt").unlink(missing_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    write_json(out / "diverged.json", {"epoch": exc.epoch, "step": exc.step, "error": str(exc)})


def json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def train_local(
    cfg, out: Path, *, resume: bool, probe: bool, experiment: str | None = "amdim", log=print
) -> dict[str, Any]:
    """Train in this process, checkpoint every epoch to ``out``, then run the offline probe.

    Everything that can be checked before training (the device, the dataset, the tracking store,
    a resumed checkpoint's configuration) is checked before anything is written under ``out``.
    """
    from amdim import checkpoint as ckpt_io
    from amdim import data as data_mod
    from amdim import trainer
    from amdim.config import to_flat
    from amdim.evaluate import final_evaluation

    device = trainer.resolve_device(cfg.train.device)
    bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    ckpt_path = out / "checkpoint.pt"
    payload = None
    if resume and ckpt_path.exists():
        payload = ckpt_io.load(ckpt_path)
        if payload["config"] != {**to_flat(cfg), "train.epochs": payload["config"]["train.epochs"]}:
            raise UserError(f"{ckpt_path} was trained with a different configuration; use another --out")
        log(f"resuming from {ckpt_path} at epoch {payload['epoch']}")
    uri = None
    if experiment:
        from amdim.harness import tracking

        uri = tracking.tracking_uri()
        tracking.check_tracking(uri)
    out.mkdir(parents=True, exist_ok=True)
    flat = to_flat(cfg)
    (out / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
    record = None
    if uri is not None:
        tags = tracking.run_tags(flat, str(device), {"launcher": "local"})
        record = tracking.RunRecord.create(uri, experiment, out.name, flat, tags)
        record.log_artifact(out / "config.json")

    def save(metrics: dict[str, float], make_payload) -> None:
        ckpt_io.save(ckpt_path, make_payload())
        if record is not None:
            record.log_metrics(metrics, step=int(metrics["epoch"]))

    monitor = (
        tracking.system_metrics(uri, record.run_id, cfg.train.system_metrics_s)
        if record is not None
        else contextlib.nullcontext()
    )
    try:
        t0 = time.perf_counter()
        with monitor:
            state = trainer.fit(cfg, bundle=bundle, resume=payload, on_epoch_end=save, log=log, device=device)
        train_time = time.perf_counter() - t0
        ckpt_io.save(ckpt_path, trainer.checkpoint_payload(cfg, state, bundle.n_classes))  # --epochs 0 too
        if record is not None:
            record.set_tags({"checkpoint_path": str(ckpt_path.resolve())})
        result: dict[str, Any] = {
            "config": flat,
            "epochs": state.epoch,
            "history": state.history,
            "train_time_s": train_time,
            "checkpoint": str(ckpt_path),
        }
        final = final_evaluation(
            state.core, cfg, bundle, device, epoch=state.epoch, probe=probe,
            segmentation=out / "segmentation.png" if record is not None else None,
        )  # fmt: skip
        if "probe" in final:
            result["probe"] = final["probe"]
        if record is not None:
            if "probe" in final:
                record.log_probe(final["probe"])
            if "segmentation" in final:
                record.log_artifact(final["segmentation"])
            result["run_id"] = record.run_id
            record.finish("FINISHED")
    except DivergedError as exc:
        leave_no_result(out, exc)
        if record is not None:
            record.mark_diverged(exc.epoch, exc.step)
            record.finish("FAILED")
        raise
    except BaseException:
        if record is not None:
            record.finish("KILLED")
        raise
    write_json(out / "metrics.json", result)
    return result
