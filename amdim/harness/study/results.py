"""Reading a study back: its state and trials (``amdim study status``, ``amdim study list``), its
best configuration and the export of it, and the exact config of any recorded run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from amdim.config import from_flat, to_flat
from amdim.errors import UserError
from amdim.harness import tracking
from amdim.harness.study import layout
from amdim.harness.study.records import STATE_COMPLETE, study_runs
from amdim.harness.tracking_queue import SPOOL


def best_configuration(name: str) -> dict[str, Any]:
    """The study's best configuration by its rank metric (``objective.rank``, never the test set
    unless the spec says so): the mean over its confirm-stage seeds where the confirm stage ran
    it, else over its search runs; and, within it, the run with the best value (whose checkpoint
    stands for the configuration)."""
    spec = layout.load_study_spec(name)
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
    layout.write_json(out / "config.json", payload["config"])
    layout.write_json(out / "export.json", {**best, "checkpoint_source": str(source), "epoch": int(payload["epoch"]),
                                      "tracking_uri": tracking.tracking_uri()})  # fmt: skip
    return {**best, "out": str(out)}


def study_status(name: str) -> dict[str, Any]:
    """Counts of trials by state per stage (from MLflow) and Optuna's view of the search."""
    from collections import Counter

    import optuna

    from amdim.harness.tracking_queue import refused_writes, spooled

    spec = layout.load_study_spec(name)
    out: dict[str, Any] = {"study": name, "folder": str(layout.study_dir(name)), "stages": {}}
    state_path = layout.study_dir(name) / "state.json"
    if state_path.is_file():
        out["stage_states"] = {
            k: layout.stage_state(v) for k, v in layout.read_json(state_path).get("stages", {}).items()
        }
    out["spooled"] = len(spooled(layout.study_dir(name) / SPOOL))
    out["refused"] = refused_writes(layout.study_dir(name) / SPOOL)
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
    study = layout.optuna_study(name)
    if study is None:
        return out
    out["optuna"] = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    out["optuna"] = {k: v for k, v in out["optuna"].items() if v}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if done:
        best = max(done, key=lambda t: t.value)
        out["best"] = {"number": best.number, spec.rank_metric: best.value, "params": best.params,
                       "tune_trial_id": best.user_attrs.get("tune_trial_id")}  # fmt: skip
    return out


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
    if status.get("refused"):
        lines.append(
            f"  {status['refused']} trial record(s) refused by the tracking server (a deleted run or "
            f"experiment?), kept with its answers in {status['folder']}/{SPOOL}/refused/"
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


def list_studies() -> list[dict[str, Any]]:
    """``amdim study list``: every study under the storage root, with each stage's state and its
    trials as Optuna has them (no tracking server needed)."""
    out = []
    for name in layout.study_names():
        record = layout.state(name)
        study = layout.optuna_study(name)
        trials = study.get_trials(deepcopy=False) if study is not None else []
        out.append(
            {
                "study": name,
                "stages": {k: layout.stage_state(v) for k, v in record.get("stages", {}).items()},
                "trials": len(trials),
                "complete": sum(t.state.name == "COMPLETE" for t in trials),
            }
        )
    return out


def format_list(studies: list[dict[str, Any]]) -> str:
    if not studies:
        return f"no studies under {layout.storage_root()}"
    lines = [f"studies under {layout.storage_root()}:"]
    for s in studies:
        stages = ", ".join(f"{k} {v}" for k, v in s["stages"].items()) or "not started"
        lines.append(f"  {s['study']}: {stages}; {s['trials']} search trials, {s['complete']} complete")
    return "\n".join(lines)
