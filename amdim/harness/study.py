"""``amdim study``: a Ray Tune search over a study spec, with Optuna, ASHA and MLflow.

One study lives in one folder, ``$AMDIM_STORAGE/<name>`` (default ``runs/studies/<name>``)::

    spec.json      the validated spec and its fingerprint (a changed spec is refused, not mixed in)
    state.json     the MLflow parent run id and experiment
    optuna.db      the Optuna study (SQLite; ``amdim dashboard NAME`` serves it)
    tune/search/   the Tune experiment of the search (and tune/confirm/ for the confirm stage);
                   on the Tune path also every trial's per-epoch checkpoints
    train/         on the Train path, one Ray Train run per trial, with its per-epoch checkpoints

A trial trains one of two ways (``budget.launcher``; ``auto`` picks by ``budget.workers``):

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

MLflow: one parent run per study, one child run per trial nested under it (``mlflow.parentRunId``)
with every key of the trial's flat config as a parameter (the sampled keys hold exactly the values
Optuna chose) and a ``state`` tag: complete, early_stopped, diverged or failed. A child is found
again by its ``tune_trial_id`` tag, so a resumed study never duplicates one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amdim.config import from_flat, to_flat
from amdim.errors import ConfigError, UserError
from amdim.harness import tracking
from amdim.harness.study_spec import SpecError, StudySpec, config_id, parse_spec
from amdim.harness.tracking_queue import SPOOL, RunKey

DRIVER_CPU = 0.25  # the trial function only waits on its Train run; workers hold the real resources
STATE_COMPLETE, STATE_EARLY, STATE_FAILED, STATE_RUNNING = "complete", "early_stopped", "failed", "running"
STATE_DIVERGED = "diverged"  # the loss stopped being finite: MLflow FAILED, Optuna FAIL
STATE_INTERRUPTED = "interrupted"  # Ctrl-C stopped it: MLflow KILLED, Optuna RUNNING until resumed


# --- where a study lives ------------------------------------------------------------------------


def storage_root() -> Path:
    """``$AMDIM_STORAGE`` (shared storage on a cluster) or ``<runs>/studies``, absolute."""
    env = os.environ.get("AMDIM_STORAGE")
    if env and "://" in env:
        raise UserError(
            f"AMDIM_STORAGE={env}: must be a filesystem path shared by all nodes (an NFS mount); "
            "object storage URIs are not supported for study folders"
        )
    return Path(env).expanduser().resolve() if env else tracking.runs_dir() / "studies"


def study_dir(name: str) -> Path:
    return storage_root() / name


def optuna_url(name: str) -> str:
    return f"sqlite:///{study_dir(name) / 'optuna.db'}"


def optuna_storage(name: str):
    """The study's Optuna RDB storage. Opening it creates the database's tables when they are
    missing, so two processes opening a new database at once (the driver starting the study and
    ``amdim study status``, optuna-dashboard or a test reading it) can race to create them; the
    loser gets an OperationalError ("table ... already exists") or an IntegrityError (the same
    version row twice) and simply opens it again."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(optuna_url(name))
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == 9:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable study record ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def load_study_spec(name: str) -> StudySpec:
    """The spec a study was started with (``amdim study resume/status/confirm NAME``)."""
    path = study_dir(name) / "spec.json"
    if not path.is_file():
        raise UserError(
            f"no study named '{name}' under {storage_root()} (start it with `amdim study run SPEC`)"
        )
    return parse_spec(_read_json(path)["source"], origin=str(path))


# --- resources ----------------------------------------------------------------------------------


def trial_bundles(spec: StudySpec) -> list[tuple[str, dict[str, float], int]]:
    """What one trial holds at once, as ``(what, bundle, count)``: each bundle must fit on one node.
    On the Tune path the trial's one actor, which trains; on the Train path its waiting driver
    actor and its Train workers."""
    b = spec.budget
    worker = {
        "CPU": b.cpus_per_worker,
        **({"GPU": b.gpus_per_worker} if b.gpus_per_worker else {}),
        **dict(b.worker_resources),
    }
    if b.path == "tune":
        return [("worker", worker, 1)]
    return [("driver", actor_resources(spec), 1), ("worker", worker, b.workers)]


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """Everything one trial holds at once, summed over its bundles."""
    need: dict[str, float] = {}
    for _, bundle, count in trial_bundles(spec):
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + count * amount
    return need


def actor_resources(spec: StudySpec) -> dict[str, float]:
    """What the trial's Tune actor reserves: the whole trial on the Tune path, only the waiting
    driver (``DRIVER_CPU`` and ``driver_resources``) on the Train path."""
    if spec.budget.path == "train":
        return {"CPU": DRIVER_CPU, **dict(spec.budget.driver_resources)}
    return trial_bundles(spec)[0][1]


def concurrency(spec: StudySpec, nodes: list[Any], where: str = "the cluster") -> int:
    """How many trials the nodes (:class:`amdim.harness.raycluster.NodeType`: now, or all an
    autoscaler may add) hold at once, each bundle of a trial on one node; capped by
    ``budget.max_concurrent`` and ``budget.trials``.

    Raises SpecError, in one line naming the field and the amounts, when no node can ever hold a
    bundle of the trial, or the nodes together never hold one whole trial.
    """
    from amdim.harness.raycluster import fits, slots

    b = spec.budget
    n = spec.budget.trials
    for what, bundle, count in trial_bundles(spec):
        if not any(fits(bundle, t.resources) for t in nodes):
            for name, amount in bundle.items():
                largest = max((t.resources.get(name, 0.0) for t in nodes), default=0.0)
                if amount > largest + 1e-9:
                    field = (
                        {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}.get(name, "worker_resources")
                        if what == "worker"
                        else ("driver_resources" if name != "CPU" else "workers")
                    )
                    unit = f" {name}{'s' if name in ('CPU', 'GPU') else ''}"
                    per = (
                        " per worker"
                        if what == "worker"
                        else f" for its driver ({DRIVER_CPU:g} CPU + driver_resources)"
                    )
                    raise SpecError(
                        f"budget.{field}: a trial needs {amount:g}{unit}{per}, and no node of {where} has "
                        f"more than {largest:g}"
                    )
            raise SpecError(f"budget: no node of {where} holds one {what} of a trial ({bundle})")
        n = min(n, slots(bundle, nodes) // count)
    if n < 1:
        need = trial_resources(spec)
        raise SpecError(
            f"budget.workers: a trial needs {b.workers} workers of {trial_bundles(spec)[-1][1]}"
            f" ({', '.join(f'{v:g} {k}' for k, v in need.items() if v)} in all), more than {where} can hold"
        )
    if b.max_concurrent:
        n = min(n, b.max_concurrent)
    return max(1, n)


# --- the trial function (runs in a Tune trial actor) --------------------------------------------


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: build the trial's config, open its MLflow run, train it.

    On the Tune path (``ctx["launcher"] == "tune"``, single-worker trials) the trainer runs right
    here, in the trial's actor, which holds the trial's CPUs and GPU share; on the Train path the
    trial starts a Ray Train job and waits for it. Either way every epoch is reported to Tune with
    a checkpoint, and a finished trial ends with the offline probe's result.

    A trial that fails in a way a retry would repeat (its sampled values make no valid
    configuration together, its data cannot be read, it runs out of memory) ends at once as
    failed, with the reason on its MLflow run and its Optuna trial; anything else (a process that
    died) is raised, and Tune restarts the trial from its last checkpoint. Nothing here waits for
    the tracking server: MLflow writes go through this process's tracking queue.
    """
    import ray
    import ray.tune

    from amdim.harness.tracking_queue import RunKey, flush_seconds, process_queue
    from amdim.harness.trial import read_outcome, write_outcome

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    point = dict(config["point"]) if "point" in config else dict(config)
    seed = point.pop("_seed", None)
    source = point.pop("_source_trial", None)
    sampled = {k: point[k] for k in ctx["keys"]}
    flat = {**ctx["base_flat"], **sampled}
    if seed is not None:
        flat["train.seed"] = seed
    try:
        cfg = from_flat(flat)
    except ConfigError as exc:
        invalid = str(exc)
    else:
        flat, invalid = to_flat(cfg), None

    sdir = Path(ctx["study_dir"])
    outcome_path = sdir / "trials" / f"{ctx['stage']}-{trial_id}.json"
    if (ended := read_outcome(outcome_path)) is not None:
        # It ended before the driver died, but after Tune last saved its state: report the
        # recorded end instead of training again.
        ray.tune.report({**_final_result(ended), "recorded": 1})
        return

    records = process_queue(sdir / SPOOL)
    key = RunKey(
        ctx["tracking_uri"], experiment=ctx["experiment"], parent=ctx["parent_run_id"], tune_trial_id=trial_id
    )
    name = f"{ctx['stage']}-{trial_id}" + (f"-seed{flat['train.seed']}" if seed is not None else "")
    tags = tracking.run_tags(flat, _device_tag(ctx), {"launcher": f"ray-tune ({ctx['launcher']} path)"})
    tags.update(
        {
            "study": ctx["study"],
            "stage": ctx["stage"],
            "config_id": config_id(sampled),
            "sampled_keys": ",".join(ctx["keys"]),
            "seed": str(flat["train.seed"]),
            "setting": _label(ctx, sampled),
            "trial_path": ctx["launcher"],
            **({"confirm_of": str(source)} if source is not None else {}),
        }
    )
    records.ensure(key, name, flat, tags)
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
    b = ctx["budget"]
    if b["gpus_per_worker"] and flat["train.device"] == "auto":
        flat = {**flat, "train.device": "cuda"}
    loop_config = {
        "flat": flat,
        "run_key": key.as_dict(),
        "spool": str(sdir / SPOOL),
        "probe": True,
        "quiet": True,
    }
    try:
        if ctx["launcher"] == "tune":
            final = _train_in_actor(loop_config)
        else:
            final = _train_as_job(loop_config, ctx, trial_id)
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


def _final_result(ended: dict[str, Any]) -> dict[str, Any]:
    """The last result a trial reports for a recorded end (:func:`amdim.harness.trial.write_outcome`)."""
    if ended["state"] == STATE_FAILED:
        return {"trial_error": 1, "error": ended.get("error", "")}
    metrics = dict(ended.get("metrics", {}))
    if ended["state"] == STATE_DIVERGED:
        return {**metrics, "diverged": 1}
    return metrics


def _train_in_actor(loop_config: dict[str, Any]) -> dict[str, Any]:
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


def _train_as_job(loop_config: dict[str, Any], ctx: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The Train path: a Ray Train job whose rank-0 worker reports to this trial through
    ``TuneReportCallback``; its deterministic name makes a restarted trial resume its own run.
    Ray Train itself does not retry a failed worker group (only a preempted node): Tune restarts
    the trial, so that one error is never retried by both. Returns rank 0's last report."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from amdim.harness.ray_train import worker_loop

    b = ctx["budget"]
    resources = {
        **dict(map(tuple, b["worker_resources"])),
        "CPU": b["cpus_per_worker"],
        **({"GPU": b["gpus_per_worker"]} if b["gpus_per_worker"] else {}),
    }
    result = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=b["workers"], use_gpu=bool(b["gpus_per_worker"]), resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if b["gpus_per_worker"] and b["workers"] > 1 else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{ctx['stage']}-{trial_id}",
            storage_path=ctx["train_dir"],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
            callbacks=[TuneReportCallback()],
        ),
    ).fit()
    return dict(result.return_value or {})


def _device_tag(ctx: dict[str, Any]) -> str:
    b = ctx["budget"]
    return f"{b['workers']}x " + (f"{b['gpus_per_worker']:g} GPU" if b["gpus_per_worker"] else "CPU (gloo)")


def _label(ctx: dict[str, Any], sampled: dict[str, Any]) -> str:
    for point, label in zip(ctx["points"], ctx["labels"], strict=True):
        if point == sampled:
            return label
    return ""


# --- launching ----------------------------------------------------------------------------------


def _check_existing(spec: StudySpec) -> bool:
    """True when the study folder already holds this same spec (a resume); refuse a changed one."""
    path = study_dir(spec.name) / "spec.json"
    if not path.is_file():
        return False
    stored = _read_json(path)
    if stored.get("fingerprint") != spec.fingerprint():
        old, new = stored.get("source", {}), spec.source
        changed = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), sort_keys=True, default=str)
                         != json.dumps(new.get(k), sort_keys=True, default=str))  # fmt: skip
        raise SpecError(
            f"study '{spec.name}' already exists in {path.parent} with a different spec "
            f"(changed: {', '.join(changed) or 'values'}); rename the study or delete that folder"
        )
    return True


def _cluster_guard(ray, n_nodes: int) -> None:
    """On several nodes (now, or once the autoscaler has added them), study folders must live on
    storage every node reads and writes: refuse to start without ``AMDIM_STORAGE``, and check that
    every node up now really sees the same folder (nodes added later mount it from the same
    setup commands)."""
    if n_nodes <= 1:
        return
    env = os.environ.get("AMDIM_STORAGE")
    if not env:
        raise UserError(
            f"the Ray cluster has {n_nodes} nodes (counting those its autoscaler may add) but AMDIM_STORAGE "
            "is not set; set it to a shared filesystem path (e.g. an NFS mount) that every node can read and write"
        )
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = storage_root()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".storage-check-{uuid.uuid4().hex}"
    marker.write_text("amdim\n")
    try:
        probe = ray.remote(num_cpus=0)(lambda p: os.path.exists(p))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        seen = ray.get(
            [
                probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(marker))
                for n in nodes
            ],
            timeout=120,
        )
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise UserError(
            f"AMDIM_STORAGE={env} is not shared: node(s) {', '.join(blind)} cannot see it; "
            "mount the same filesystem at that path on every node"
        )


class _RayScope:
    """``ray.init`` unless connected already; shut down only what we started.

    ``lean``: a local Ray for a study whose trials all train in their Tune actors starts without
    the dashboard. Nothing of such a study needs it (Train V2's placement-group cleaner does,
    which is why the Train path keeps it), and on a small machine its processes take CPU from the
    trials and a second off Ray's start-up (measured in docs/benchmarks.md).
    """

    def __init__(self, lean: bool = False, while_starting: Callable[[], None] | None = None):
        self.lean = lean
        self.while_starting = while_starting
        self.inherited: dict[str, str] | None = None

    def __enter__(self):
        import ray

        from amdim.harness.raycluster import init_ray, joins_a_cluster

        local = not joins_a_cluster()
        extra = {"include_dashboard": False} if self.lean and local else {}
        beside = _beside_local_ray_start(self.while_starting) if local and self.while_starting else None
        try:
            self.started = init_ray(log_to_driver=False, logging_level="ERROR", **extra)
        finally:
            if beside is not None:
                beside.join()
        # The environment every worker of a Ray started here inherits (from its raylet).
        self.inherited = dict(os.environ) if self.started and local else None  # as init_ray started it
        return ray

    def __exit__(self, *exc):
        from amdim.harness.raycluster import shutdown_ray

        if self.started:
            shutdown_ray()


def _beside_local_ray_start(work: Callable[[], None]):
    """A started thread running ``work`` while the caller starts a local Ray.

    ``ray.init`` spends most of its 3-4 s on 2 cores waiting, without the GIL, for the processes it
    started (the raylet's registration with the GCS). MLflow's imports (about 1.5 s of the
    driver's time) fit in that wait instead of following it: measured in docs/benchmarks.md.
    Two threads importing at once can meet inside a package that imports itself circularly and
    see it half-initialised, so the modules that ``ray.init`` imports lazily and MLflow imports
    too (click, and what Ray's dashboard check pulls in: aiohttp, OpenTelemetry, pydantic, gRPC)
    are imported here first; from then on the two threads import no module in common (checked
    for Ray 2.60 and MLflow 3.17, with and without the dashboard). ``work`` must not raise.
    """
    import threading

    import click  # noqa: F401

    with contextlib.suppress(ImportError):  # another Ray's layout: Ray imports what it needs itself
        import ray.dashboard.optional_deps  # noqa: F401
    thread = threading.Thread(target=work, name="beside-ray-start", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _trial_actors_inherit_env(inherited: dict[str, str] | None):
    """Tune's trial actors in the workers Ray prestarted, where Tune's runtime env for them repeats
    what they inherit.

    Tune gives every trial actor a runtime env of environment variables (``PL_DISABLE_FORK=1`` for
    Lightning, and Ray Train's variables copied from the driver). Any runtime env makes Ray start a
    new Python process for the actor through its runtime-env agent, and leaves idle the workers it
    prestarted at ``ray.init`` (which have imported Ray already): measured in docs/benchmarks.md,
    about 1.2 s of CPU per new actor on 2 cores. On a Ray that this process started, every worker
    already has the driver's environment from ``ray.init``; when each variable Tune would set has
    that value there, the runtime env changes nothing and is left out. ``inherited`` None (a Ray
    joined, not started), or any variable that differs: Tune's own runtime env.
    """
    if inherited is None:
        yield
        return
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # another Ray: its own behaviour
        yield
        return
    tune_get = class_cache._ActorClassCache.get

    def get(self, trainable_cls):
        remote_cls = tune_get(self, trainable_cls)
        options = getattr(remote_cls, "_default_options", None) or {}
        runtime_env = options.get("runtime_env") or {}
        if (
            isinstance(runtime_env, dict)
            and set(runtime_env) == {"env_vars"}
            and all(inherited.get(k) == v for k, v in (runtime_env["env_vars"] or {}).items())
        ):
            import ray

            remote_cls = self._cache[trainable_cls] = ray.remote(trainable_cls)
        return remote_cls

    class_cache._ActorClassCache.get = get
    try:
        yield
    finally:
        class_cache._ActorClassCache.get = tune_get


def _capacity(ray) -> tuple[list[Any], str]:
    """The nodes a study can count on: every node type with its most nodes where the cluster
    autoscales (:func:`amdim.harness.raycluster.autoscaling_config_path`), else the live nodes;
    and a line saying which."""
    from amdim.harness.raycluster import autoscaling_config_path, autoscaling_node_types, live_nodes

    now = live_nodes(ray)
    total = {}
    for t in now:
        for k in ("CPU", "GPU"):
            total[k] = total.get(k, 0.0) + t.resources.get(k, 0.0)
    up = f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs on {len(now)} node(s)"
    path = autoscaling_config_path()
    if path is None:
        return now, up
    types = autoscaling_node_types(path)
    kinds = ", ".join(
        f"{t.count}x {t.name} {{{', '.join(f'{k}: {v:g}' for k, v in t.resources.items())}}}" for t in types
    )
    return types, f"{up} now; autoscaling up to {kinds} ({path})"


def _parent_run(spec: StudySpec, uri: str, log) -> str:
    """The study's MLflow parent run: created once, found again on resume."""
    import mlflow

    state_path = study_dir(spec.name) / "state.json"
    if state_path.is_file():
        parent = _read_json(state_path)["parent_run_id"]
        mlflow.MlflowClient(uri).update_run(parent, status="RUNNING")
        return parent
    flat = to_flat(spec.base)
    tags = tracking.run_tags(flat, "study", {"kind": "study", "study": spec.name, "stage": "study",
                                             "spec_fingerprint": spec.fingerprint()})  # fmt: skip
    record = tracking.RunRecord.create(uri, spec.name, f"study-{spec.name}", {}, tags)
    client = mlflow.MlflowClient(uri)
    b = spec.budget
    params = {
        "study.sampler": f"{spec.sampler.type} (seed {spec.sampler.seed})",
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
    for k, v in params.items():
        client.log_param(record.run_id, k, str(v))
    record.log_dict(spec.source, "spec.json")
    _write_json(state_path, {"parent_run_id": record.run_id, "experiment": spec.name, "tracking_uri": uri})
    log(f"MLflow: experiment '{spec.name}', parent run {record.run_id}")
    return record.run_id


def _ctx(spec: StudySpec, uri: str, parent: str, stage: str) -> dict[str, Any]:
    from dataclasses import asdict

    sdir = study_dir(spec.name)
    return {
        "study": spec.name,
        "stage": stage,
        "experiment": spec.name,
        "tracking_uri": uri,
        "parent_run_id": parent,
        "base_flat": to_flat(spec.base),
        "keys": spec.keys,
        "points": [dict(p) for p in spec.points],
        "labels": list(spec.point_labels),
        "budget": asdict(spec.budget),
        "launcher": spec.budget.path,
        "train_dir": str(sdir / "train"),
        "study_dir": str(sdir),
    }


def _fail_orphans(spec: StudySpec) -> int:
    """Optuna trials left RUNNING by a driver that died before Tune saved them: mark them FAIL."""
    import optuna

    path = study_dir(spec.name) / "optuna.db"
    if not path.is_file():
        return 0
    storage = optuna_storage(spec.name)
    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        return 0
    n = 0
    for t in storage.get_all_trials(study_id, deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, "state", "abandoned")
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def _check_tune_state(spec: StudySpec, exp_path: Path) -> None:
    """Refuse to resume from a saved Tune state that this version cannot load: a study started by
    an earlier amdim whose modules have moved since (e.g. ``amdim.study_search`` before
    ``amdim/harness/``), or a damaged ``tuner.pkl``. Tune would raise the same from
    ``Tuner.restore``, after the parent run and the Optuna trials had been touched."""
    path = exp_path / "tuner.pkl"
    if not path.is_file():
        return
    import pickle

    try:
        with path.open("rb") as f:
            pickle.load(f)  # imports what the state refers to (ray.tune, ...); Ray need not run
    except Exception as exc:  # whatever stops it loading stops Tune's restore too
        raise UserError(
            f"study '{spec.name}' cannot be resumed: its Tune state {path} does not load in this "
            f"version of amdim ({type(exc).__name__}: {exc}), so another version started the study "
            "or the file is damaged; its recorded runs are untouched: finish it with the version "
            "that started it, or give the study a new name to start it afresh"
        ) from None


def _tuner(spec: StudySpec, ctx: dict[str, Any], n_concurrent: int, exp_path: Path, log):
    import logging

    import ray.tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler

    from amdim.harness.study_search import EpochASHA, QuietTrialFailures, StudyProgress

    logging.getLogger("ray.tune.execution.tune_controller").addFilter(QuietTrialFailures())

    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, ctx=ctx), actor_resources(spec))
    if ray.tune.Tuner.can_restore(str(exp_path)):
        log(f"resuming the {ctx['stage']} stage from {exp_path}")
        return ray.tune.Tuner.restore(
            str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    progress = StudyProgress(ctx, spec.budget.epochs, spec.online_metric, spec.rank_metric)
    run_config = ray.tune.RunConfig(
        name=exp_path.name,
        storage_path=str(exp_path.parent),
        verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=spec.budget.max_failures),
        # Tune-path trials checkpoint through Tune (Train-path ones through their Train run).
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
        # Tune's per-trial progress.csv and result.json, without its TensorBoard logger
        # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS in raycluster.DRIVER_ENV).
        callbacks=[progress, CSVLoggerCallback(), JsonLoggerCallback()],
    )
    if ctx["stage"] == "confirm":
        return ray.tune.Tuner(
            trainable,
            param_space={"point": ray.tune.grid_search(ctx["confirm_points"])},
            tune_config=ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=n_concurrent),
            run_config=run_config,
        )
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scheduler = (
        EpochASHA(
            last_epoch=spec.budget.epochs,
            metric=spec.online_metric,
            mode=spec.online_mode,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
        if spec.scheduler.type == "asha"
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            search_alg=_searcher(spec),
            scheduler=scheduler,
            num_samples=spec.budget.trials,
            max_concurrent_trials=n_concurrent,
            reuse_actors=spec.budget.path == "tune",
        ),
        run_config=run_config,
    )


def _searcher(spec: StudySpec):
    import optuna
    import optuna.distributions as dist

    from amdim.harness.study_search import AmdimOptunaSearch

    space = {}
    for p in spec.search:
        if p.type == "choice":
            space[p.key] = dist.CategoricalDistribution(list(p.values))
        elif p.type == "int":
            space[p.key] = dist.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            space[p.key] = dist.FloatDistribution(float(p.low), float(p.high), log=p.log)
    if spec.sampler.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.sampler.seed)
    elif spec.sampler.type == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.sampler.seed)
    else:
        sampler = optuna.samplers.GridSampler(
            {p.key: p.grid_values() for p in spec.search}, seed=spec.sampler.seed
        )
    return AmdimOptunaSearch(
        space=space,
        metric=spec.rank_metric,
        mode="max",
        online_metric=spec.online_metric,
        sampler=sampler,
        study_name=spec.name,
        storage=optuna_storage(spec.name),
        points_to_evaluate=[dict(p) for p in spec.points] or None,
    )


def run_study(spec: StudySpec, *, log=print) -> dict[str, Any]:
    """Run (or continue) the search stage of ``spec``; returns the status summary."""
    return _run_stage(spec, "search", _check_existing(spec), log)


def _run_stage(spec: StudySpec, stage: str, resuming: bool, log, confirm_points=None) -> dict[str, Any]:
    """Run one stage (``search`` or ``confirm``) of a study to its end, or until Ctrl-C.

    Everything that can be refused is refused before Ray starts (a changed spec, a saved Tune
    state this version cannot load, a tracking server that does not answer, data that cannot be
    read, a trial this machine can never hold) and, once connected, before anything is written (a
    trial no node type of the cluster can ever hold, a multi-node cluster without shared storage).
    The driver's MLflow bookkeeping goes through its tracking queue: Tune and Optuna are the
    record of the search, and a tracking server that stops answering delays the MLflow record,
    never the study.

    Ctrl-C: Tune saves its state and stops the trials; the stage is recorded as interrupted (the
    parent run KILLED, the unfinished trials' runs KILLED with ``state=interrupted``, their Optuna
    trials left running for Tune to resume) and the summary says so (the CLI exits 130); the same
    command resumes it. A second Ctrl-C stops at once.
    """
    from amdim.dataindex import check_readable
    from amdim.harness.raycluster import joins_a_cluster, this_machine
    from amdim.harness.tracking_queue import process_queue, replay

    if resuming:
        _check_tune_state(spec, study_dir(spec.name) / "tune" / stage)  # before anything is written
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    check_readable(spec.base.data.spec)
    if not joins_a_cluster():
        concurrency(spec, this_machine(), "this machine")  # fail before Ray starts
    sdir = study_dir(spec.name)
    replay(sdir / SPOOL)  # what an earlier stage could not send: the server answers now
    t0 = time.perf_counter()
    scope = _RayScope(lean=spec.budget.path == "tune", while_starting=lambda: tracking.warm_store(uri))
    with scope as ray:
        nodes, capacity = _capacity(ray)
        n = concurrency(spec, nodes)
        _cluster_guard(ray, sum(t.count for t in nodes))
        sdir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            _write_json(sdir / "spec.json", {"fingerprint": spec.fingerprint(), "source": spec.source})
        parent = _parent_run(spec, uri, log)
        _set_stage_state(spec.name, stage, "running")
        ctx = _ctx(spec, uri, parent, stage)
        if confirm_points is not None:
            ctx["confirm_points"] = confirm_points
        total = len(confirm_points) if confirm_points is not None else spec.budget.trials
        log(f"study '{spec.name}' {stage}: {total} trials, {n} at a time ({capacity}); folder {sdir}")
        records = process_queue(sdir / SPOOL, log)
        parent_key = RunKey(uri, run_id=parent)
        state = "failed"
        try:
            tuner = _tuner(spec, ctx, n, sdir / "tune" / stage, log)
            # The parent run's system metrics: the machine the driver runs on, over the stage.
            with (
                tracking.system_metrics(uri, parent, spec.base.train.system_metrics_s, finish_within=5.0),
                _trial_actors_inherit_env(scope.inherited),
            ):
                grid = tuner.fit()
            unfinished = grid.num_terminated + grid.num_errors < len(grid) or len(grid) < total
            state = "interrupted" if unfinished else "finished"
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the stage stays resumable
            state = "interrupted"
            raise
        finally:
            from amdim.harness.study_search import StudyProgress

            progress = StudyProgress.current()  # the experiment's own, restored with it on a resume
            wall = time.perf_counter() - t0
            _set_stage_state(spec.name, stage, state)
            if progress is not None and state == "interrupted":
                for trial_id in progress.unfinished():
                    key = RunKey(uri, experiment=spec.name, parent=parent, tune_trial_id=trial_id)
                    records.terminate(key, "KILLED", {"state": STATE_INTERRUPTED})
            records.metrics(parent_key, {f"{stage}_wall_s": wall}, step=0)
            status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(state, "FAILED")
            records.terminate(parent_key, status, {f"{stage}_state": state})
            records.close(timeout=5.0 if state == "interrupted" else None, who="the study driver")
            if stage == "search" and state == "finished":
                _fail_orphans(spec)
    replay(sdir / SPOOL)
    summary = study_status(spec.name)
    summary["wall_s"] = wall
    summary["interrupted"] = state == "interrupted"
    if state == "finished" and progress is not None and (reason := progress.all_failed()) is not None:
        summary["all_failed"] = reason
    return summary


def _set_stage_state(name: str, stage: str, state: str) -> None:
    """A stage's state in the study's ``state.json`` (``amdim study status`` reads it): running,
    interrupted (Ctrl-C: resumable), finished or failed (the driver stopped on an error)."""
    path = study_dir(name) / "state.json"
    record = _read_json(path)
    record.setdefault("stages", {})[stage] = {
        "state": state, "pid": os.getpid(), "host": platform.node(), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    _write_json(path, record)


def confirm_points(spec: StudySpec, top: int, seeds: int) -> list[dict[str, Any]]:
    """The ``top`` best complete search trials (distinct configs), each with ``seeds`` new seeds."""
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=optuna_storage(spec.name))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        raise UserError(f"study '{spec.name}' has no complete trial to confirm yet")
    best: list[Any] = []
    for t in sorted(done, key=lambda t: (-t.value, t.number)):
        if all(t.params != b.params for b in best):
            best.append(t)
    base_seed = spec.base.train.seed
    return [
        {**{k: t.params[k] for k in spec.keys}, "_seed": base_seed + s, "_source_trial": t.number}
        for t in best[:top]
        for s in range(1, seeds + 1)
    ]


def settings_points(spec: StudySpec, seeds: int) -> list[dict[str, Any]]:
    """Every labelled setting of the spec (``points``), each with ``seeds`` new seeds; the source
    trial is the search trial that ran the setting, when Optuna has one."""
    import optuna

    if not spec.points:
        raise UserError(f"study '{spec.name}' lists no labelled settings (points) to confirm")
    try:
        trials = optuna.load_study(study_name=spec.name, storage=optuna_storage(spec.name)).trials
    except KeyError:
        trials = []
    base_seed = spec.base.train.seed
    out = []
    for point in spec.points:
        source = next((t.number for t in trials if {k: t.params.get(k) for k in point} == point), None)
        out += [
            {**point, "_seed": base_seed + s, **({"_source_trial": source} if source is not None else {})}
            for s in range(1, seeds + 1)
        ]
    return out


def run_confirm(
    name: str, top: int | None, seeds: int | None, *, settings: bool = False, log=print
) -> dict[str, Any]:
    """The confirm stage: the ``top`` best configurations of the search (or, with ``settings``,
    every labelled setting of the spec), each trained again with ``seeds`` new seeds."""
    spec = load_study_spec(name)
    top = None if settings else (top or spec.confirm.top)
    seeds = seeds or spec.confirm.seeds
    if (top is not None and top < 1) or seeds < 1:
        raise UserError(f"--top and --seeds must be >= 1, got {top} and {seeds}")
    path = study_dir(name) / "confirm.json"
    mode = "settings" if settings else "top"
    if path.is_file():
        stored = _read_json(path)
        if (stored.get("mode", "top"), stored["top"], stored["seeds"]) != (mode, top, seeds):
            ran = "--settings" if stored.get("mode") == "settings" else f"--top {stored['top']}"
            raise UserError(f"the confirm stage of '{name}' already ran with {ran} --seeds {stored['seeds']}")
        points = stored["points"]  # the same trials, even if the search changed its ranking since
    else:
        points = settings_points(spec, seeds) if settings else confirm_points(spec, top, seeds)
        study_dir(name).mkdir(parents=True, exist_ok=True)
        _write_json(path, {"mode": mode, "top": top, "seeds": seeds, "points": points})
    return _run_stage(spec, "confirm", True, log, confirm_points=points)


# --- reading a study back -----------------------------------------------------------------------


def study_runs(name: str, uri: str | None = None) -> tuple[Any, str | None, list[Any]]:
    """``(client, parent run id, child runs)`` of a study, found through its ``state.json``;
    ``(client, None, [])`` before its parent run exists or when the store does not hold it."""
    import mlflow

    client = mlflow.MlflowClient(uri or tracking.tracking_uri())
    path = study_dir(name) / "state.json"
    if not path.is_file():
        return client, None, []
    state = _read_json(path)
    exp = client.get_experiment_by_name(state["experiment"])
    if exp is None:
        return client, None, []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
        max_results=50000,
    )
    return client, state["parent_run_id"], list(runs)


def best_configuration(name: str) -> dict[str, Any]:
    """The study's best configuration by its rank metric (``objective.rank``, never the test set
    unless the spec says so): the mean over its confirm-stage seeds where the confirm stage ran
    it, else over its search runs; and, within it, the run with the best value (whose checkpoint
    stands for the configuration)."""
    spec = load_study_spec(name)
    metric = spec.rank_metric
    _, _, runs = study_runs(name)
    done = [r for r in runs if r.data.tags.get("state") == STATE_COMPLETE and metric in r.data.metrics]
    if not done:
        raise UserError(f"study '{name}' has no complete trial with {metric} to export yet")
    groups: dict[str, list[Any]] = {}
    for run in done:
        groups.setdefault(run.data.tags.get("config_id", run.info.run_id), []).append(run)
    scored = []
    for config, members in groups.items():
        confirm = [r for r in members if r.data.tags.get("stage") == "confirm"]
        used = confirm or members
        values = [r.data.metrics[metric] for r in used]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else None  # over seeds (n - 1)
        scored.append((mean, config, used, std))
    mean, config, used, std = max(scored, key=lambda x: (x[0], x[1]))
    best = max(used, key=lambda r: (r.data.metrics[metric], r.info.run_id))
    return {
        "study": name,
        "metric": metric,
        "config_id": config,
        "setting": best.data.tags.get("setting", ""),
        "mean": mean,
        "std": std,
        "n_seeds": len(used),
        "stage": "confirm" if used[0].data.tags.get("stage") == "confirm" else "search",
        "run_id": best.info.run_id,
        "run_value": best.data.metrics[metric],
        "seed": best.data.params.get("train.seed"),
        "run_ids": sorted(r.info.run_id for r in used),
        "sampled": {k: best.data.params[k] for k in spec.keys if k in best.data.params},
    }


def export_best(name: str, out: Path) -> dict[str, Any]:
    """``amdim study export NAME --out DIR``: the best configuration's checkpoint (``checkpoint.pt``,
    loadable by ``amdim probe/segment --checkpoint``), its full flat config (``config.json``) and
    ``export.json`` (the MLflow run id, the rank metric's mean and std over seeds, where it came
    from). Nothing is written when the study has nothing to export."""
    import shutil

    from amdim import checkpoint as ckpt_io

    best = best_configuration(name)
    source = tracking.run_checkpoint(best["run_id"])
    payload = ckpt_io.load(source)  # a readable checkpoint, or a one-line error before any copy
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / "checkpoint.pt")
    _write_json(out / "config.json", payload["config"])
    _write_json(out / "export.json", {**best, "checkpoint_source": str(source), "epoch": int(payload["epoch"]),
                                      "tracking_uri": tracking.tracking_uri()})  # fmt: skip
    return {**best, "out": str(out)}


def study_status(name: str) -> dict[str, Any]:
    """Counts of trials by state per stage (from MLflow) and Optuna's view of the search."""
    from collections import Counter

    import optuna

    from amdim.harness.tracking_queue import spooled

    spec = load_study_spec(name)
    out: dict[str, Any] = {"study": name, "folder": str(study_dir(name)), "stages": {}}
    state_path = study_dir(name) / "state.json"
    if state_path.is_file():
        out["stage_states"] = {
            k: _stage_state(v) for k, v in _read_json(state_path).get("stages", {}).items()
        }
    out["spooled"] = len(spooled(study_dir(name) / SPOOL))
    try:
        tracking.check_tracking(tracking.tracking_uri())
        _, _, runs = study_runs(name)
    except UserError as exc:  # the tracking server is down: Optuna's view alone
        out["mlflow_error"] = str(exc)
        runs = []
    counts = Counter((r.data.tags.get("stage"), r.data.tags.get("state")) for r in runs)
    for (stage, state), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), -kv[1])):
        if stage is not None and state is not None:
            out["stages"].setdefault(stage, {})[state] = n
    try:
        study = optuna.load_study(study_name=name, storage=optuna_storage(name))
    except KeyError:
        return out
    out["optuna"] = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    out["optuna"] = {k: v for k, v in out["optuna"].items() if v}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if done:
        best = max(done, key=lambda t: t.value)
        out["best"] = {"number": best.number, spec.rank_metric: best.value, "params": best.params,
                       "tune_trial_id": best.user_attrs.get("tune_trial_id")}  # fmt: skip
    return out


def _stage_state(record: dict[str, Any]) -> str:
    """A stage's state as ``state.json`` holds it; a ``running`` stage whose driver (on this host)
    is gone was stopped without a word (killed), and a resume continues it."""
    state = record.get("state", "unknown")
    if state == "running" and record.get("host") == platform.node() and not _alive(record.get("pid")):
        return "stopped (its driver was killed)"
    return state


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def format_status(status: dict[str, Any]) -> str:
    lines = [f"study {status['study']} ({status['folder']})"]
    for stage, state in status.get("stage_states", {}).items():
        resume = "; the same command resumes it" if state != "finished" and state != "running" else ""
        lines.append(f"  {stage} stage: {state}{resume}")
    if status.get("spooled"):
        lines.append(
            f"  {status['spooled']} batch(es) of trial records not yet in MLflow (the tracking server did not "
            "answer); sent by the next study command"
        )
    if status.get("mlflow_error"):
        lines.append(f"  MLflow: {status['mlflow_error']}; trial states from Optuna only")
    elif not status["stages"]:
        lines.append("  no trials recorded yet")
    for stage, counts in status["stages"].items():
        total = sum(counts.values())
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        lines.append(f"  {stage}: {total} trials: {parts}")
    if "optuna" in status:
        lines.append("  optuna: " + ", ".join(f"{v} {k}" for k, v in status["optuna"].items()))
    if "best" in status:
        b = status["best"]
        metric = next(k for k in b if k.startswith("probe_"))
        params = " ".join(f"{k}={v}" for k, v in b["params"].items())
        lines.append(f"  best: trial {b['number']} {metric} {b[metric]:.4f}: {params}")
    return "\n".join(lines)


def config_from_run(run_id: str):
    """The exact config a recorded run was built from, rebuilt from its MLflow params alone."""
    import mlflow

    from amdim.config import ADDED_KEYS, all_keys

    uri = tracking.store_for_run(run_id)
    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"run {run_id}: not found in {uri} ({first})") from None
    params = run.data.params
    missing = [k for k in all_keys() if k not in params and k not in ADDED_KEYS]
    if missing:
        raise UserError(
            f"run {run_id}: its parameters lack {len(missing)} config keys (e.g. {missing[0]}); not an amdim run"
        )
    recorded = [k for k in all_keys() if k in params]
    cfg = from_flat({k: params[k] for k in recorded})
    rebuilt = {k: str(v) for k, v in to_flat(cfg).items()}
    # Runs recorded before train.channels_last and optim.fused took "auto" hold True/False there.
    differ = [k for k in recorded if rebuilt[k] != params[k] and rebuilt[k] != params[k].lower()]
    if differ:
        raise UserError(
            f"run {run_id}: {differ[0]}={params[differ[0]]!r} does not round-trip ({rebuilt[differ[0]]!r})"
        )
    return cfg, run
