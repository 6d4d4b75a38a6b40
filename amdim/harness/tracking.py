"""MLflow record of a training run: the one place that talks to MLflow.

The store defaults to a SQLite database under the project's runs folder
(``sqlite:////abs/runs/mlflow.db``): MLflow 3.x keeps its file store in maintenance mode and
refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, and recommends a database backend.
``MLFLOW_TRACKING_URI`` points everything at a tracking server instead. URIs are always absolute,
because Ray workers change their working directory.

A run holds: every parameter of the flat config the model was built from, per-epoch metrics
(step = epoch), the final offline linear-probe result with its protocol name, the config file (and
segmentation PNG when mixtures are on) as artifacts, and tags for git commit, package versions,
device and dataset.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from amdim.errors import UserError

DEFAULT_EXPERIMENT = "amdim"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def runs_dir() -> Path:
    """``$AMDIM_RUNS_DIR`` or ``./runs``, absolute."""
    return Path(os.environ.get("AMDIM_RUNS_DIR", "runs")).resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the SQLite store under the runs folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store's URI; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def store_for_run(run_id: str) -> str:
    """The tracking URI to read recorded run ``run_id`` from, after one-line errors for a tracking
    server that does not answer and for a local store that does not exist."""
    uri = tracking_uri()
    check_tracking(uri)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UserError(
            f"run {run_id}: no MLflow store at {path} (set AMDIM_RUNS_DIR or MLFLOW_TRACKING_URI)"
        )
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise UserError(f"MLflow tracking server {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow tracking server {uri} does not answer ({reason}); start it or unset MLFLOW_TRACKING_URI"
        ) from None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("amdim", "torch", "torchvision", "ray", "optuna", "mlflow", "numpy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_tags(flat: dict[str, Any], device: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "device": device,
        "dataset": str(flat.get("data.spec")),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    tags.update(extra or {})
    return tags


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created (with artifacts beside a local store) if missing."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    path = sqlite_path(uri)
    artifacts = (path.parent / "mlartifacts").as_uri() if path is not None else None
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def system_metrics(
    uri: str, run_id: str | Callable[[], str | None], every_s: float, finish_within: float | None = None
):
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, and
    ``system/gpu_*`` where NVML sees a GPU) logged to ``run_id`` every ``every_s`` seconds while
    the block runs; nothing when ``every_s`` is 0. A restarted run continues the step count.

    ``run_id`` may be a callable that waits for the id (a study trial's run, created by its
    tracking queue): the monitor then starts once it returns, never delaying the block.
    ``finish_within``: at the end, wait at most this long for the monitor's last sample (sent
    from its own thread, which a tracking server that does not answer keeps busy), then go on.
    """
    if not every_s:
        yield None
        return
    import threading

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    lock, state = threading.Lock(), {"monitor": None, "ended": False}

    def start(rid: str | None) -> None:
        with lock:
            if rid and not state["ended"]:
                state["monitor"] = SystemMetricsMonitor(
                    rid, sampling_interval=every_s, resume_logging=True, tracking_uri=uri
                )
                state["monitor"].start()

    if callable(run_id):
        getter = run_id
        threading.Thread(target=lambda: start(getter()), name="amdim-system-metrics", daemon=True).start()
    else:
        start(run_id)
    try:
        yield None
    finally:
        with lock:
            state["ended"] = True
            monitor = state["monitor"]
        if monitor is not None:
            ender = threading.Thread(
                target=_finish, args=(monitor,), name="amdim-system-metrics-end", daemon=True
            )
            ender.start()
            ender.join(finish_within)


def _finish(monitor) -> None:
    """Stop MLflow's monitor, then publish one last sample of the partial interval since its last
    one (the monitor publishes only at the end of each full interval, so that a run shorter than
    the interval would record nothing), through the monitor's public methods."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # a run deleted meanwhile, a server that does not answer: secondary to training
        pass


def run_checkpoint(run_id: str) -> Path:
    """The final checkpoint of a recorded run: the file its ``checkpoint_path`` tag names (set by
    ``amdim train`` and by every study trial). One-line errors for an unknown run, a run without
    the tag, and a checkpoint that is gone."""
    uri = store_for_run(run_id)
    try:
        run = _client(uri).get_run(run_id)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"run {run_id}: not found in {uri} ({first})") from None
    tag = run.data.tags.get("checkpoint_path")
    if not tag:
        raise UserError(
            f"run {run_id}: records no checkpoint_path (it stopped before its first epoch ended, or diverged)"
        )
    path = Path(tag)
    if not path.is_file():
        raise UserError(f"run {run_id}: its checkpoint {path} is gone (moved or deleted)")
    return path


class RunRecord:
    """One MLflow run, addressed by id so any process (driver, rank-0 worker) can log to it."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    @classmethod
    def create(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        flat: dict[str, Any],
        tags: dict[str, str],
        parent_run_id: str | None = None,
    ) -> RunRecord:
        from mlflow.entities import Param

        client = _client(uri)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
        params = [Param(k, str(v)) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        return cls(uri, run.info.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v  # NaN is not stored
        ]
        if batch:
            _client(self.uri).log_batch(self.run_id, metrics=batch)

    def log_probe(self, probe: dict[str, Any]) -> None:
        """Final offline probe: ``probe_test_accuracy`` etc. plus the protocol as a tag."""
        keys = ("test_accuracy", "val_accuracy", "train_accuracy", "lr", "weight_decay")
        self.log_metrics(
            {f"probe_{k}": probe[k] for k in keys if k in probe}, step=int(probe.get("epoch", 0))
        )
        self.set_tags({"probe_protocol": str(probe["protocol"])})
        self.log_dict(probe, "probe.json")

    def set_tags(self, tags: dict[str, str]) -> None:
        client = _client(self.uri)
        for k, v in tags.items():
            client.set_tag(self.run_id, k, v)

    def mark_diverged(self, epoch: int, step: int) -> None:
        """Say on the run where its loss stopped being finite (read back by :meth:`divergence`)."""
        self.set_tags(
            {
                "state": "diverged",
                "diverged_at": f"epoch {epoch} step {step}",
                "diverged_at_epoch": str(epoch),
                "diverged_at_step": str(step),
            }
        )

    def divergence(self) -> tuple[int, int] | None:
        """(epoch, step) where the run's training diverged, as its rank-0 worker recorded it, or
        None. A Ray Train job's result cannot say so: under Train V2 ``Result.metrics`` are those
        of the last report *with a checkpoint*, and a diverged report has none."""
        tags = _client(self.uri).get_run(self.run_id).data.tags
        if tags.get("state") != "diverged" or "diverged_at_epoch" not in tags:
            return None
        return int(tags["diverged_at_epoch"]), int(tags["diverged_at_step"])

    def log_dict(self, obj: Any, name: str) -> None:

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
            self.log_artifact(path)

    def log_artifact(self, path: str | Path) -> None:
        _client(self.uri).log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        _client(self.uri).set_terminated(self.run_id, status=status)
