"""Study benchmarks for docs/benchmarks.md (each prints one JSON object).

``python -m analysis.bench_studies smoke``
    Runs ``studies/smoke.yaml`` in a fresh runs folder twice, on the Tune path (single-worker
    trials train in their Tune actors) and on the Train path (one Ray Train job per trial), and
    splits each wall-clock into in-trial work (training steps, per-epoch online evaluation and
    the offline probes, summed over trials from their MLflow records) and harness overhead (Ray
    and Tune start-up, trial actors and Train worker groups, scheduling, checkpoints, MLflow and
    Optuna bookkeeping). With ``slots`` trials running at once, the overhead fraction is
    ``1 - in_trial / (wall * slots)``: the share of the trial slots' time not spent training.
    Also each trial's start-up: Tune starting the trial to the end of its first training step,
    and where the overhead goes: the wall before the first trial's run and after the last one's,
    and the idle tail (slot time left free at the end, when no trial is left to start).

``python -m analysis.bench_studies smoke --repeat N`` (also ``minute``)
    The same N times, each in its own runs folder (``RUNS/run-1`` ... ``RUNS/run-N``), and the
    spread of each path's overhead over the N runs (each run's figure, min, median, max). One
    run's figure moves by a few points with which trials ASHA stops (the results' order decides)
    and with the machine's speed at the time; the median of several runs is the figure to quote.

``python -m analysis.bench_studies minute [--seconds 60]``
    The same split for ``studies/bench/minute.yaml``, whose trials are sized on this machine
    (a short timing of the training step first) to train about ``--seconds`` each.

``python -m analysis.bench_studies search [--data SPEC]``
    Runs ``studies/bench/proxy-grid.yaml`` (every point of a 3 x 3 grid, full epochs) and
    ``studies/bench/proxy-tpe.yaml`` (TPE + ASHA over the same space, as many trials), then
    reports how many training epochs TPE + ASHA had spent, over all its trials, when it first
    finished a trial whose ranking metric was within 1 point of the grid's best, as a fraction of
    the grid's epoch budget. One seed each: the proxy's noise is part of the answer.

``python -m analysis.bench_studies packing [--resource cpu|gpu] [--shares 1.75,0.75] [--preset P] [--set K=V]``
    Study throughput: runs ``studies/bench/packing.yaml`` (4 single-worker trials, no early
    stopping) once per per-trial share of the resource (``--resource gpu``: ``gpus_per_worker``,
    e.g. ``1,0.5,0.25`` for one, two or four trials per GPU; ``cpu``: ``cpus_per_worker``). For
    each arrangement it reports the trials at once, the images trained over the study, images/s
    end to end (images / study wall-clock) and images/s summed over the trials while they train
    (each trial's images / its own training time, mean over trials, times the trials at once).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runs(args) -> Path:
    runs = Path(args.runs or tempfile.mkdtemp(prefix="amdim-bench-")) / "runs"
    os.environ["AMDIM_RUNS_DIR"] = str(runs)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return runs


def _children(name: str):
    from amdim.harness.study import study_runs

    client, _, runs = study_runs(name)
    return client, runs


def _sum_metric(client, run_id: str, key: str) -> float:
    """Sum over epochs (0 when the run never logged ``key``, e.g. no probe after an early stop)."""
    from analysis.collect import metric_by_epoch

    return float(sum(metric_by_epoch(client, run_id, key).values()))


def idle_tail_slot_s(spans: list[tuple[float, float]], slots: int) -> float:
    """Slot-seconds with no trial running, from the start of the last trial to start until the last
    trial ends: the study's idle tail, when early stopping has ended the other trials and the
    budget has no trial left to start. ``spans`` are the trials' (start, end) times."""
    if not spans:
        return 0.0
    lo, hi = max(s for s, _ in spans), max(e for _, e in spans)
    cuts = sorted({lo, hi, *(t for span in spans for t in span if lo < t < hi)})
    idle = 0.0
    for a, b in itertools.pairwise(cuts):
        running = sum(1 for s, e in spans if s <= (a + b) / 2 < e)
        idle += max(0, slots - running) * (b - a)
    return idle


def _study_figures(spec) -> dict:
    """Run ``spec`` and split its wall-clock into in-trial work and harness overhead.

    In-trial work is what the trials' own MLflow records say they spent: training steps
    (``epoch_time_s``), the per-epoch online evaluation (``eval_time_s``) and the offline probe
    (``probe_time_s``). With ``slots`` trials at once the overhead fraction is
    ``1 - in_trial / (wall * slots)``. ``startup_s`` is each trial's start-up as the driver saw it:
    Tune starting its actor to the end of its first training step; the first ``slots`` trials to
    start are the ones that got a new actor.

    Where the rest goes, from the trials' MLflow runs (each run opens when its trial has set up
    and closes when the trial ends): ``before_first_trial_s``, the command's start to the first
    trial's run; ``after_last_trial_s``, the last trial's end to the command's end; and
    ``idle_tail_slot_s`` (:func:`idle_tail_slot_s`), the slot time left idle at the end because no
    trial was left to start, which depends on the study's shape and on which trials ASHA stopped,
    not on the harness. ``overhead_fraction_without_idle_tail`` leaves that time out of the
    slots' time; ``overhead_fraction`` (the issue's figure) counts it.
    """
    import statistics

    from amdim.harness import study

    started = time.time()
    t0 = time.perf_counter()
    summary = study.run_study(spec, log=lambda s: print(s, file=sys.stderr))
    wall = time.perf_counter() - t0
    ended = started + wall
    client, children = _children(spec.name)
    train = sum(_sum_metric(client, r.info.run_id, "epoch_time_s") for r in children)
    evals = sum(_sum_metric(client, r.info.run_id, "eval_time_s") for r in children)
    probe = sum(_sum_metric(client, r.info.run_id, "probe_time_s") for r in children)
    epochs = sum(len({m.step for m in client.get_metric_history(r.info.run_id, "epoch")}) for r in children)
    from amdim.harness.raycluster import this_machine

    slots = study.concurrency(spec, this_machine(), "this machine")
    in_trial = train + evals + probe
    by_start = sorted(children, key=lambda r: r.info.start_time)
    startup = [
        [
            m.value
            for m in sorted(client.get_metric_history(r.info.run_id, "startup_s"), key=lambda m: m.timestamp)
        ]
        for r in by_start
    ]
    first = [s[0] for s in startup if s]
    spans = [(r.info.start_time / 1000, (r.info.end_time or ended * 1000) / 1000) for r in children]
    idle = idle_tail_slot_s(spans, slots)
    return {
        "study": spec.name,
        "trial_path": spec.budget.path,
        "trials": len(children),
        "states": summary["stages"].get("search", {}),
        "epochs_trained": epochs,
        "wall_s": round(wall, 1),
        "train_s": round(train, 1),
        "eval_s": round(evals, 1),
        "probe_s": round(probe, 1),
        "in_trial_s": round(in_trial, 1),
        "mean_trial_in_trial_s": round(in_trial / max(1, len(children)), 1),
        "slots": slots,
        "overhead_fraction": round(1 - in_trial / (wall * slots), 3),
        "overhead_per_trial_s": round((wall * slots - in_trial) / max(1, len(children)), 1),
        "before_first_trial_s": round(min(s for s, _ in spans) - started, 1) if spans else None,
        "after_last_trial_s": round(ended - max(e for _, e in spans), 1) if spans else None,
        "idle_tail_slot_s": round(idle, 1),
        "overhead_fraction_without_idle_tail": round(1 - in_trial / (wall * slots - idle), 3),
        "startup_s_new_actors": [round(v, 2) for v in first[:slots]],
        "startup_s_later_trials": [round(v, 2) for v in first[slots:]],
        "startup_s_median": round(statistics.median(first), 2) if first else None,
    }


def _both_paths(raw: dict, origin: str, paths: str = "tune,train") -> dict:
    """The same spec on the Tune path (trials train in their Tune actors) and on the Train path
    (one Ray Train job per trial), one after the other in this run."""
    from amdim.harness.study_spec import parse_spec

    out = {}
    for path in paths.split(","):
        spec_raw = {**raw, "name": f"{raw['name']}-{path}", "budget": {**raw["budget"], "launcher": path}}
        out[path] = _study_figures(parse_spec(spec_raw, origin=origin))
        print(json.dumps(out[path]), file=sys.stderr)
    return out


def _machine() -> dict:
    import platform

    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = [f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(f)]
    model = caps.get("cpu_name") or platform.processor() or platform.machine()
    return {"cpu": f"{model}, {os.cpu_count()} CPUs, flags {' '.join(flags) or 'none of avx2/avx512/amx'}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}  # fmt: skip


def smoke(args) -> dict:
    import yaml

    runs = _runs(args)
    raw = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    return {"runs": str(runs), **_machine(), "paths": _both_paths(raw, "studies/smoke.yaml", args.paths)}


def minute(args) -> dict:
    """Trials that train about ``--seconds`` each (calibrated on this machine), on both paths."""
    import torch
    import yaml

    from amdim.bench import run_bench
    from amdim.config import preset, with_overrides
    from amdim.harness.trial import worker_threads

    runs = _runs(args)
    raw = yaml.safe_load((ROOT / "studies" / "bench" / "minute.yaml").read_text())
    base = raw["base"]["set"]
    epochs, batch = raw["budget"]["epochs"], base["data.batch_size"]
    # Calibrate: the training step's rate here, with the torch threads one trial will have.
    cfg = with_overrides(
        preset(raw["base"]["preset"]), {**base, "data.spec": "synthetic:n_train=512,n_test=64"}
    )
    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads(raw["budget"]["cpus_per_worker"]))
    rate = run_bench(cfg, batch, "cpu", steps=6, warmup=2, data=False)["step_images_per_s"]
    torch.set_num_threads(before)
    steps = max(1, round(args.seconds * rate / batch / epochs))
    base["train.max_steps_per_epoch"] = steps
    raw["base"]["data"] = f"synthetic:n_train={steps * batch},n_test=512"
    return {
        "runs": str(runs),
        **_machine(),
        "calibration": {"step_images_per_s": round(rate, 1), "steps_per_epoch": steps, "epochs": epochs},
        "paths": _both_paths(raw, "studies/bench/minute.yaml", args.paths),
    }


def search(args) -> dict:
    import optuna

    from amdim.harness import study
    from amdim.harness.study_spec import load_spec

    _runs(args)
    over = {"data.spec": args.data} if args.data else {}
    results = {}
    for name in ("proxy-grid", "proxy-tpe"):
        spec = load_spec(ROOT / "studies" / "bench" / f"{name}.yaml", over)
        t0 = time.perf_counter()
        study.run_study(spec, log=lambda s: print(s, file=sys.stderr))
        results[name] = {"wall_s": round(time.perf_counter() - t0, 1), "spec": spec}
    grid_spec = results["proxy-grid"]["spec"]
    metric = grid_spec.rank_metric
    grid = optuna.load_study(study_name="proxy-grid", storage=study.optuna_storage("proxy-grid"))
    grid_done = [t for t in grid.trials if t.value is not None]
    best = max(t.value for t in grid_done)
    grid_epochs = len(grid.trials) * grid_spec.budget.epochs

    # Replay the TPE + ASHA study in time order: every logged epoch and every finished trial.
    client, children = _children("proxy-tpe")
    events = []
    for run in children:
        for m in client.get_metric_history(run.info.run_id, "epoch"):
            events.append((m.timestamp, "epoch", run.info.run_id, None))
        for m in client.get_metric_history(run.info.run_id, metric):
            events.append((m.timestamp, "final", run.info.run_id, m.value))
    events.sort(key=lambda e: (e[0], e[1] == "final"))
    seen, spent, hit = set(), 0, None
    for ts, kind, run_id, value in events:
        if kind == "epoch" and (run_id, ts) not in seen:
            seen.add((run_id, ts))
            spent += 1
        elif kind == "final" and value >= best - 0.01 and hit is None:
            hit = {"epochs_spent": spent, "value": value, "run_id": run_id}
    tpe = optuna.load_study(study_name="proxy-tpe", storage=study.optuna_storage("proxy-tpe"))
    tpe_total = sum(
        len({m.step for m in client.get_metric_history(r.info.run_id, "epoch")}) for r in children
    )
    return {
        "data": grid_spec.base.data.spec,
        "metric": metric,
        "grid_best": round(best, 4),
        "grid_values": sorted(round(t.value, 4) for t in grid_done),
        "grid_epochs": grid_epochs,
        "grid_wall_s": results["proxy-grid"]["wall_s"],
        "tpe_trials": len(tpe.trials),
        "tpe_states": {
            s.name: sum(t.state == s for t in tpe.trials)
            for s in optuna.trial.TrialState
            if any(t.state == s for t in tpe.trials)
        },
        "tpe_epochs_total": tpe_total,
        "tpe_best": round(max((t.value for t in tpe.trials if t.value is not None), default=float("nan")), 4),
        "tpe_wall_s": results["proxy-tpe"]["wall_s"],
        "within_1_point": hit,
        "budget_fraction_to_within_1_point": round(hit["epochs_spent"] / grid_epochs, 3) if hit else None,
        "budget_fraction_total": round(tpe_total / grid_epochs, 3),
    }


def _trial_images(client, run_id: str) -> tuple[float, float]:
    """(images trained, seconds spent training them) by one trial, from its per-epoch metrics."""
    from analysis.collect import metric_by_epoch

    rate = metric_by_epoch(client, run_id, "images_per_s")
    secs = metric_by_epoch(client, run_id, "epoch_time_s")
    return sum(rate[e] * secs[e] for e in rate if e in secs), sum(secs.values())


def _max_overlap(spans: list[tuple[int, int | None]]) -> int:
    """The most intervals open at one time (MLflow start/end times of the trials' runs)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans if b is not None])
    most = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first: touching runs do not overlap
        now += step
        most = max(most, now)
    return most


def packing(args) -> dict:
    import yaml

    from amdim.config import parse_set_args
    from amdim.harness import study
    from amdim.harness.study_spec import parse_spec

    runs = _runs(args)
    raw = yaml.safe_load((ROOT / "studies" / "bench" / "packing.yaml").read_text())
    try:
        shares = [float(x) for x in args.shares.split(",")]
    except ValueError:
        raise SystemExit(f"--shares must be comma-separated numbers, got {args.shares!r}") from None
    field = "gpus_per_worker" if args.resource == "gpu" else "cpus_per_worker"
    rows = []
    for share in shares:
        spec_raw = {
            **raw,
            "name": f"packing-{args.resource}-{share:g}",
            "budget": {**raw["budget"], field: share},
        }
        base = {**raw["base"], "set": {**raw["base"]["set"], **parse_set_args(args.set)}}
        if args.resource == "gpu":
            base["set"]["train.device"] = "cuda"
        if args.preset:
            base["preset"] = args.preset
        if args.data:
            base["data"] = args.data
        spec_raw["base"] = base
        spec = parse_spec(spec_raw, origin="studies/bench/packing.yaml")
        t0 = time.perf_counter()
        study.run_study(spec, log=lambda s: print(s, file=sys.stderr))
        wall = time.perf_counter() - t0
        client, children = _children(spec.name)
        per_trial = [_trial_images(client, r.info.run_id) for r in children]
        images = sum(n for n, _ in per_trial)
        trial_rates = [n / t for n, t in per_trial if t > 0]
        slots = _max_overlap([(r.info.start_time, r.info.end_time) for r in children])
        threads = sorted({r.data.tags.get("torch_threads", "?") for r in children})
        mean_rate = sum(trial_rates) / len(trial_rates) if trial_rates else float("nan")
        rows.append(
            {
                "study": spec.name,
                field: share,
                "trials": len(children),
                "trials_at_once": slots,
                "torch_threads_per_trial": threads,
                "images_trained": round(images),
                "wall_s": round(wall, 1),
                "study_images_per_s": round(images / wall, 1),
                "mean_trial_images_per_s": round(mean_rate, 1),
                "summed_training_images_per_s": round(mean_rate * slots, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {"runs": str(runs), "resource": args.resource, "arrangements": rows}


SPREAD_KEYS = ("overhead_fraction", "overhead_fraction_without_idle_tail", "idle_tail_slot_s")


def spread(runs: list[dict]) -> dict:
    """Per path and per figure of :data:`SPREAD_KEYS`: each run's value, and their min, median
    and max. ``runs`` are :func:`smoke` or :func:`minute` outputs; a path missing from a run (or
    a figure missing from a path) is left out of that path's values, not counted as zero."""
    import statistics

    out: dict[str, dict] = {}
    for path in dict.fromkeys(p for r in runs for p in r["paths"]):
        figures = {}
        for key in SPREAD_KEYS:
            values = [r["paths"][path][key] for r in runs if path in r["paths"] and key in r["paths"][path]]
            if values:
                figures[key] = {
                    "runs": values,
                    "min": min(values),
                    "median": round(statistics.median(values), 4),
                    "max": max(values),
                }
        out[path] = figures
    return out


def repeated(bench, args) -> dict:
    """``bench`` (:func:`smoke` or :func:`minute`) ``args.repeat`` times, each in a runs folder
    of its own under ``args.runs``, and :func:`spread` over them."""
    base = Path(args.runs or tempfile.mkdtemp(prefix="amdim-bench-"))
    runs = []
    for i in range(1, args.repeat + 1):
        args.runs = str(base / f"run-{i}")
        runs.append(bench(args))
        print(f"run {i} of {args.repeat}: " + json.dumps(spread(runs[-1:])), file=sys.stderr)
    return {"runs": str(base), **_machine(), "repeat": args.repeat, "spread": spread(runs), "each": runs}


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.bench_studies", description=__doc__.splitlines()[0]
    )
    parser.add_argument("which", choices=["smoke", "minute", "search", "packing"])
    parser.add_argument("--runs", help="folder for the runs (default: a fresh temporary folder)")
    parser.add_argument("--data", help="data spec for the search and packing benchmarks")
    parser.add_argument(
        "--resource", choices=["cpu", "gpu"], default="cpu", help="packing: what trials share"
    )
    parser.add_argument(
        "--shares", default="1.75,0.75", help="packing: per-trial shares of the resource, comma-separated"
    )
    parser.add_argument(
        "--preset", help="packing: the base preset instead of the spec's (e.g. cifar on a GPU)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="packing: base config overrides"
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="minute: the training time each trial is sized to"
    )
    parser.add_argument(
        "--paths",
        default="tune,train",
        choices=["tune,train", "tune", "train"],
        help="smoke, minute: the trial paths to run (default both, one after the other)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="smoke, minute: run it N times (each in its own runs folder) and report the spread",
    )
    args = parser.parse_args()
    if args.repeat < 1 or (args.repeat > 1 and args.which not in ("smoke", "minute")):
        parser.error("--repeat takes a count >= 1, and more than 1 only for smoke and minute")
    bench = {"smoke": smoke, "minute": minute, "search": search, "packing": packing}[args.which]
    out = repeated(bench, args) if args.repeat > 1 else bench(args)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
