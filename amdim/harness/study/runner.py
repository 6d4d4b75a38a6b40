"""Running a study stage: Ray started or joined, everything checkable checked first, the Tuner
built (or restored) and run to its end or to Ctrl-C, and the stage's record closed.

Everything that can be refused is refused before Ray starts (a changed spec, a saved Tune state
this version cannot load, a tracking server that does not answer, data that cannot be read, a
trial this machine can never hold) and, once connected, before anything is written (a trial no
node type of the cluster can ever hold, a multi-node cluster without shared storage).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from amdim.config import to_flat
from amdim.errors import UserError
from amdim.harness import tracking
from amdim.harness.study import layout
from amdim.harness.study.context import TrialContext
from amdim.harness.study.records import STATE_INTERRUPTED, parent_run, trial_key
from amdim.harness.study.resources import actor_resources, concurrency
from amdim.harness.study.trial import run_trial
from amdim.harness.study_spec import StudySpec
from amdim.harness.tracking_queue import SPOOL, RunKey


class RayScope:
    """``ray.init`` unless connected already (starting a local Ray or joining a cluster, see
    :func:`amdim.harness.raycluster.init_ray`); shut down only what it started.

    ``lean``: a local Ray for a study whose trials all train in their Tune actors starts without
    the dashboard. Nothing of such a study needs it (Train V2's placement-group cleaner does,
    which is why the Train path keeps it), and on a small machine its processes take CPU from the
    trials and a second off Ray's start-up (measured in docs/benchmarks.md).
    """

    def __init__(self, lean: bool = False):
        self.lean = lean
        self.started = False

    def __enter__(self):
        import ray

        from amdim.harness.raycluster import init_ray, joins_a_cluster

        extra = {"include_dashboard": False} if self.lean and not joins_a_cluster() else {}
        self.started = init_ray(log_to_driver=False, logging_level="ERROR", **extra)
        return ray

    def __exit__(self, *exc):
        import ray

        if self.started:
            ray.shutdown()


def cluster_guard(ray, n_nodes: int) -> None:
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

    root = layout.storage_root()
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


def capacity(ray) -> tuple[list[Any], str]:
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


def check_tune_state(spec: StudySpec, exp_path: Path) -> None:
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


def searcher(spec: StudySpec):
    """The study's Optuna searcher: the spec's space as Optuna distributions, its sampler seeded."""
    import optuna
    import optuna.distributions as dist

    from amdim.harness.study.search import StudySearcher

    space = {}
    for p in spec.search:
        if p.type == "choice":
            space[p.key] = dist.CategoricalDistribution(list(p.values))
        elif p.type == "int":
            space[p.key] = dist.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            space[p.key] = dist.FloatDistribution(float(p.low), float(p.high), log=p.log)
    s = spec.sampler
    points = list(spec.points)
    if s.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "grid":
        # Every point of the grid, in a seeded random order, enqueued like labelled points (the
        # spec has no more trials than grid points). Optuna's GridSampler would do the same, but
        # ends the study from inside `tell` when its last point is told, which only works within
        # Optuna's own optimize loop.
        import itertools
        import random

        keys = [p.key for p in spec.search]
        points = [
            dict(zip(keys, v, strict=True))
            for v in itertools.product(*(p.grid_values() for p in spec.search))
        ]
        random.Random(s.seed).shuffle(points)
    return StudySearcher(
        study_name=spec.name, storage_url=layout.optuna_url(spec.name), space=space, sampler=sampler,
        metric=spec.rank_metric, online_metric=spec.online_metric, points=points,
    )  # fmt: skip


def tuner(spec: StudySpec, ctx: TrialContext, n_concurrent: int, exp_path: Path, log):
    """The stage's Tuner: restored from ``exp_path`` when Tune saved one there (a resume), else new."""
    import logging

    import ray.tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler

    from amdim.harness.study.search import QuietTrialFailures, StudyProgress, asha

    logging.getLogger("ray.tune.execution.tune_controller").addFilter(QuietTrialFailures())
    StudyProgress.use(ctx)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, ctx=ctx), actor_resources(spec))
    if ray.tune.Tuner.can_restore(str(exp_path)):
        log(f"resuming the {ctx.stage} stage from {exp_path}")
        return ray.tune.Tuner.restore(
            str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    run_config = ray.tune.RunConfig(
        name=exp_path.name,
        storage_path=str(exp_path.parent),
        verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=spec.budget.max_failures),
        # Tune-path trials checkpoint through Tune (Train-path ones through their Train run).
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
        # Tune's per-trial progress.csv and result.json, without its TensorBoard logger
        # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS in raycluster.DRIVER_ENV).
        callbacks=[
            StudyProgress(ctx, spec.budget.epochs, spec.online_metric, spec.rank_metric),
            CSVLoggerCallback(),
            JsonLoggerCallback(),
        ],
    )
    if ctx.stage == "confirm":
        return ray.tune.Tuner(
            trainable,
            param_space={"point": ray.tune.grid_search(list(ctx.confirm_points))},
            tune_config=ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=n_concurrent),
            run_config=run_config,
        )
    scheduler = (
        asha(
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
            search_alg=searcher(spec),
            scheduler=scheduler,
            num_samples=spec.budget.trials,
            max_concurrent_trials=n_concurrent,
            reuse_actors=spec.budget.path == "tune",
        ),
        run_config=run_config,
    )


def context(
    spec: StudySpec, uri: str, parent: str, stage: str, confirm: list[dict[str, Any]] | None
) -> TrialContext:
    return TrialContext(
        study=spec.name,
        stage=stage,
        tracking_uri=uri,
        parent_run_id=parent,
        base_flat=to_flat(spec.base),
        keys=tuple(spec.keys),
        points=tuple(dict(p) for p in spec.points),
        labels=tuple(spec.point_labels),
        budget=spec.budget,
        study_dir=str(layout.study_dir(spec.name)),
        confirm_points=tuple(confirm or ()),
    )


def failures(grid) -> str | None:
    """When every trial of a finished stage failed (its error, a failure a retry would repeat, or
    a diverged loss): how many, and the most common reason; else None."""
    from collections import Counter

    from amdim.harness.ray_train import last_error_line

    reasons = []
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None:
            reasons.append(last_error_line(str(result.error)) or type(result.error).__name__)
        elif metrics.get("trial_error") or metrics.get("invalid_config"):
            reasons.append(str(metrics.get("error", "invalid configuration")))
        elif metrics.get("diverged"):
            reasons.append("diverged (non-finite loss)")
        else:
            return None
    if not reasons:
        return None
    reason, count = Counter(reasons).most_common(1)[0]
    return f"all {len(reasons)} trials failed; the most common reason ({count} of them): {reason}"


def run_stage(
    spec: StudySpec, stage: str, resuming: bool, log, confirm: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Run one stage (``search`` or ``confirm``) of a study to its end, or until Ctrl-C.

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
    from amdim.harness.study.results import study_status
    from amdim.harness.study.search import StudyProgress, fail_orphans
    from amdim.harness.tracking_queue import process_queue, replay

    sdir = layout.study_dir(spec.name)
    if resuming:
        check_tune_state(spec, sdir / "tune" / stage)  # before anything is written
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    check_readable(spec.base.data.spec)
    if not joins_a_cluster():
        concurrency(spec, this_machine(), "this machine")  # fail before Ray starts
    replay(sdir / SPOOL)  # what an earlier stage could not send: the server answers now
    t0 = time.perf_counter()
    with RayScope(lean=spec.budget.path == "tune") as ray:
        nodes, counted = capacity(ray)
        n = concurrency(spec, nodes)
        cluster_guard(ray, sum(t.count for t in nodes))
        if not resuming:
            layout.write_spec(spec)
        parent = parent_run(spec, uri, log)
        layout.set_stage_state(spec.name, stage, "running")
        ctx = context(spec, uri, parent, stage, confirm)
        total = len(confirm) if confirm is not None else spec.budget.trials
        log(f"study '{spec.name}' {stage}: {total} trials, {n} at a time ({counted}); folder {sdir}")
        records = process_queue(sdir / SPOOL, log)
        parent_key = RunKey(uri, run_id=parent)
        state, grid = "failed", None
        try:
            stage_tuner = tuner(spec, ctx, n, sdir / "tune" / stage, log)
            # The parent run's system metrics: the machine the driver runs on, over the stage.
            with tracking.system_metrics(uri, parent, spec.base.train.system_metrics_s, finish_within=5.0):
                grid = stage_tuner.fit()
            # After Ctrl-C Tune marks the trials it stopped TERMINATED like finished ones, so the
            # grid alone cannot tell them apart once every trial has started: the callback saw
            # which trials ended (completed, early-stopped or failed) and which did not.
            progress = StudyProgress.current()
            unfinished = (
                grid.num_terminated + grid.num_errors < len(grid)
                or len(grid) < total
                or (progress is not None and bool(progress.unfinished()))
            )
            state = STATE_INTERRUPTED if unfinished else "finished"
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the stage stays resumable
            state = STATE_INTERRUPTED
            raise
        finally:
            wall = time.perf_counter() - t0
            layout.set_stage_state(spec.name, stage, state)
            progress = StudyProgress.current()  # the experiment's own, restored with it on a resume
            if progress is not None and state == STATE_INTERRUPTED:
                for trial_id in progress.unfinished():
                    records.terminate(trial_key(ctx, trial_id), "KILLED", {"state": STATE_INTERRUPTED})
            records.metrics(parent_key, {f"{stage}_wall_s": wall}, step=0)
            status = {"finished": "FINISHED", STATE_INTERRUPTED: "KILLED"}.get(state, "FAILED")
            records.terminate(parent_key, status, {f"{stage}_state": state})
            records.close(timeout=5.0 if state == STATE_INTERRUPTED else None, who="the study driver")
            if stage == "search" and state == "finished":
                fail_orphans(spec.name)
    replay(sdir / SPOOL)
    summary = study_status(spec.name)
    summary["wall_s"] = wall
    summary["interrupted"] = state == STATE_INTERRUPTED
    if state == "finished" and (reason := failures(grid)) is not None:
        summary["all_failed"] = reason
    return summary


def run_study(spec: StudySpec, *, log=print) -> dict[str, Any]:
    """Run (or continue) the search stage of ``spec``; returns the status summary."""
    return run_stage(spec, "search", layout.check_existing(spec), log)


def confirm_points(spec: StudySpec, top: int, seeds: int) -> list[dict[str, Any]]:
    """The ``top`` best complete search trials (distinct configs), each with ``seeds`` new seeds."""
    import optuna

    study = layout.optuna_study(spec.name)
    trials = study.trials if study is not None else []
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
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
    if not spec.points:
        raise UserError(f"study '{spec.name}' lists no labelled settings (points) to confirm")
    study = layout.optuna_study(spec.name)
    trials = study.trials if study is not None else []
    base_seed = spec.base.train.seed
    out = []
    for point in spec.points:
        source = next((t.number for t in trials if {k: t.params.get(k) for k in point} == point), None)
        out += [
            {**point, "_seed": base_seed + s, **({"_source_trial": source} if source is not None else {})}
            for s in range(1, seeds + 1)
        ]
    return out


def confirm_selection(spec: StudySpec, top: int | None, seeds: int, settings: bool) -> list[dict[str, Any]]:
    """The confirm stage's runs: the ``top`` best (:func:`confirm_points`), every labelled setting
    (:func:`settings_points`), or with both the best and then every labelled setting not among them."""
    if not settings:
        return confirm_points(spec, top, seeds)
    if top is None:
        return settings_points(spec, seeds)
    points = confirm_points(spec, top, seeds)
    chosen = [{k: p[k] for k in spec.keys} for p in points]
    return points + [p for p in settings_points(spec, seeds) if {k: p[k] for k in spec.keys} not in chosen]


def run_confirm(
    name: str, top: int | None, seeds: int | None, *, settings: bool = False, log=print
) -> dict[str, Any]:
    """The confirm stage: the ``top`` best configurations of the search (or, with ``settings``,
    every labelled setting of the spec; with both, the ``top`` best and every labelled setting not
    among them), each trained again with ``seeds`` new seeds."""
    spec = layout.load_study_spec(name)
    top = top if settings else (top or spec.confirm.top)
    seeds = seeds or spec.confirm.seeds
    if (top is not None and top < 1) or seeds < 1:
        raise UserError(f"--top and --seeds must be >= 1, got {top} and {seeds}")
    path = layout.study_dir(name) / "confirm.json"
    mode = ("top+settings" if top is not None else "settings") if settings else "top"
    if path.is_file():
        stored = layout.read_json(path)
        if (stored.get("mode", "top"), stored["top"], stored["seeds"]) != (mode, top, seeds):
            ran = {"settings": "--settings", "top+settings": f"--top {stored['top']} --settings"}.get(
                stored.get("mode", "top"), f"--top {stored['top']}"
            )
            raise UserError(f"the confirm stage of '{name}' already ran with {ran} --seeds {stored['seeds']}")
        points = stored["points"]  # the same trials, even if the search changed its ranking since
    else:
        points = confirm_selection(spec, top, seeds, settings)
        layout.study_dir(name).mkdir(parents=True, exist_ok=True)
        layout.write_json(path, {"mode": mode, "top": top, "seeds": seeds, "points": points})
    return run_stage(spec, "confirm", True, log, confirm=points)
