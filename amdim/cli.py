"""The ``amdim`` command line.

Every user mistake (bad ``--set``, missing data, corrupt checkpoint, a GPU asked for where none
exists) ends as one line on stderr and exit code 2, never a traceback. A run whose loss stops
being finite ends the same way, with exit code 3; a study stage in which every trial failed with
4 (the most common reason in the line); Ctrl-C with 130 (a study: resumable by the same command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from amdim.errors import DivergedError, UserError
from amdim.harness.local import json_default

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # training stopped on a non-finite loss
EXIT_FAILED = 4  # a study stage ended with every one of its trials failed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


def _add_config_args(p: argparse.ArgumentParser, *, data_default: str | None = None) -> None:
    p.add_argument("--preset", default="tiny", help="starting configuration (see `amdim config --list`)")
    p.add_argument("--data", default=data_default, help="data spec: synthetic, cifar10:ROOT, npz:PATH, ...")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (overrides train.epochs)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )


def build_config(args: argparse.Namespace):
    """Preset + ``--data``/``--epochs`` + ``--set`` overrides, validated."""
    from amdim.config import parse_set_args, preset, with_overrides

    overrides: dict[str, Any] = {}
    if getattr(args, "data", None):
        overrides["data.spec"] = args.data
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    overrides.update(parse_set_args(args.overrides))
    return with_overrides(preset(args.preset), overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from amdim.config import PRESETS, to_flat

    if args.list:
        print("\n".join(PRESETS))
        return 0
    flat = to_flat(build_config(args))
    if args.json:
        print(json.dumps(flat, indent=2))
    else:
        width = max(map(len, flat))
        for key, value in flat.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.smoke_test:
        from amdim.config import with_overrides

        cfg = with_overrides(cfg, {"train.epochs": 1, "train.max_steps_per_epoch": 2, "probe.epochs": 2})
    out = Path(args.out or f"runs/train-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.local:
        from amdim.harness.local import train_local

        result = train_local(
            cfg, out, resume=args.resume, probe=not args.no_probe,
            experiment=None if args.no_track else args.experiment,
        )  # fmt: skip
    else:
        from amdim.harness.ray_train import train_ray

        if args.no_track:
            raise UserError("--no-track is for --local runs; a Ray run is always recorded in MLflow")
        result = train_ray(
            cfg,
            out,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
            experiment=args.experiment,
            probe=not args.no_probe,
        )
    if "probe" in result:
        p = result["probe"]
        print(
            f"linear probe ({p['protocol']}): test accuracy {p['test_accuracy']:.4f} "
            f"(val {p['val_accuracy']:.4f}, lr {p['lr']:g}, wd {p['weight_decay']:g}) "
            f"after {result['epochs']} epochs"
        )
    print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")
    return 0


def _checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint PATH``, or the checkpoint an MLflow run's ``checkpoint_path`` tag names."""
    if args.checkpoint:
        return Path(args.checkpoint)
    from amdim.harness.tracking import run_checkpoint

    return run_checkpoint(args.run)


def cmd_probe(args: argparse.Namespace) -> int:
    from amdim import checkpoint as ckpt_io
    from amdim import data as data_mod
    from amdim import trainer
    from amdim.config import parse_set_args, with_overrides
    from amdim.evaluate import evaluate_encoder

    args.checkpoint = _checkpoint_path(args)
    payload = ckpt_io.load(args.checkpoint)
    device = trainer.resolve_device(args.device)
    model, cfg = trainer.model_from_checkpoint(payload, device)
    overrides = parse_set_args(args.overrides)
    if args.data:
        overrides["data.spec"] = args.data
    cfg = with_overrides(cfg, overrides)
    bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    result = evaluate_encoder(model.encoder, bundle, cfg, device)
    result.update({"checkpoint": str(args.checkpoint), "epoch": int(payload["epoch"]), "data": cfg.data.spec})
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
    else:
        print(f"{result['protocol']}: test accuracy {result['test_accuracy']:.4f} on {cfg.data.spec}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from amdim import checkpoint as ckpt_io
    from amdim import data as data_mod
    from amdim import evaluate, trainer

    args.checkpoint = _checkpoint_path(args)
    payload = ckpt_io.load(args.checkpoint)
    device = trainer.resolve_device(args.device)
    model, cfg = trainer.model_from_checkpoint(payload, device)
    if model.mixture is None:
        raise UserError(f"{args.checkpoint} was trained without mixtures (loss.n_mix=1): nothing to segment")
    bundle = data_mod.load_data(args.data or cfg.data.spec, cfg.model.image_size)
    out = evaluate.write_segmentation(model, cfg, bundle, Path(args.out), n=args.n, device=device)
    print(f"wrote {out} ({cfg.loss.n_mix} components)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from amdim.harness import tracking

    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        tracking.check_tracking(uri)
        print(f"MLflow tracking server: {uri}")
        return 0
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {url} (Ctrl-C stops it)", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on a study's Optuna database, on 127.0.0.1 unless told otherwise."""
    from amdim.harness import study

    db = study.study_dir(args.name) / "optuna.db"
    if not db.is_file():
        raise UserError(f"no Optuna database for a study named '{args.name}' under {study.storage_root()}")
    from optuna_dashboard import run_server

    storage = study.optuna_storage(args.name)
    print(
        f"optuna-dashboard for study '{args.name}' ({db}) at http://{args.host}:{args.port} (Ctrl-C stops it)",
        flush=True,
    )
    try:
        run_server(storage, host=args.host, port=args.port)  # wsgiref: nothing written under $HOME
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from amdim.bench import bench_device, run_bench

    bench_device(args.device)  # fail in one line before building anything
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.smoke_test else (args.steps, args.warmup)
    if args.concurrent:
        from amdim.bench import run_shared_bench

        try:
            counts = [int(x) for x in args.concurrent.split(",")]
        except ValueError:
            raise UserError(
                f"--concurrent must be comma-separated process counts, got '{args.concurrent}'"
            ) from None
        result = run_shared_bench(
            build_config(args), args.batch_size, args.device, counts, steps, warmup,
            threads=args.threads, preset=args.preset,
        )  # fmt: skip
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    result = run_bench(
        build_config(args),
        args.batch_size,
        args.device,
        steps,
        warmup,
        preset=args.preset,
        data=not args.no_data,
        peak_tflops=args.peak_tflops,
    )
    options = result["options"]
    names = {"fused": "fused_adam", "matmul": "matmul_precision"}
    for key in ("amp", "matmul", "channels_last", "fused", "compile"):  # for people; the JSON has it too
        print(f"amdim bench: {key} = {options[names.get(key, key)]}: {options['why'][key]}", file=sys.stderr)
    for label, rate, tflops, frac in (
        ("training loop (amdim train's)", "loop_images_per_s", "loop_tflops", "loop_fraction_of_bf16_peak"),
        ("model step alone", "step_images_per_s", "tflops", "fraction_of_bf16_peak"),
    ):
        peak = f", {100 * result[frac]:.1f} % of the bf16 peak" if result.get(frac) else ""
        print(
            f"amdim bench: {label}: {result[rate]:.1f} img/s, {result[tflops]:.3f} TFLOP/s{peak}",
            file=sys.stderr,
        )
    if "data_images_per_s" in result:
        print(
            f"amdim bench: data path alone: {result['data_images_per_s']:.1f} img/s "
            f"({100 * result['data_share_of_loop']:.1f} % of the loop's time)",
            file=sys.stderr,
        )
    print(json.dumps(result, indent=2, default=json_default))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from amdim.config import parse_set_args
    from amdim.harness import study
    from amdim.harness.study_spec import load_spec, smoke_variant

    if args.study_command == "run":
        overrides = parse_set_args(args.overrides)
        if args.data:
            overrides["data.spec"] = args.data
        elif args.smoke_test:
            overrides["data.spec"] = "synthetic"  # the smoke variant trains on generated data anyway
        spec = load_spec(args.spec, overrides, args.spec_sets)
        if args.smoke_test:
            spec = smoke_variant(spec, keep_data=bool(args.data))
        summary = study.run_study(spec)
    elif args.study_command == "resume":
        summary = study.run_study(study.load_study_spec(args.name))
    elif args.study_command == "list":
        print(study.format_list(study.list_studies()))
        return 0
    elif args.study_command == "export":
        info = study.export_best(args.name, Path(args.out))
        spread = f" ± {info['std']:.4f}" if info["std"] is not None else ""
        print(
            f"best configuration {info['config_id']} ({info['setting'] or 'sampled'}): {info['metric']} "
            f"{info['mean']:.4f}{spread} over {info['n_seeds']} seed(s); run {info['run_id']}"
        )
        print(f"wrote {args.out}/checkpoint.pt, config.json and export.json")
        return 0
    elif args.study_command == "confirm":
        summary = study.run_confirm(args.name, args.top, args.seeds, settings=args.settings)
    else:
        summary = study.study_status(args.name)
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
            return 0
    print(study.format_status(summary))
    if "wall_s" in summary:
        print(f"wall-clock {summary['wall_s']:.1f} s")
    if summary.get("interrupted"):
        print(
            f"amdim: study '{summary['study']}' interrupted; run the same command to resume it",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if summary.get("all_failed"):
        print(f"amdim: error: study '{summary['study']}': {summary['all_failed']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    import mlflow

    from amdim.config import with_overrides
    from amdim.harness import study, tracking

    cfg, run = study.config_from_run(args.run_id)
    if args.epochs is not None:
        cfg = with_overrides(cfg, {"train.epochs": args.epochs})
    uri = tracking.tracking_uri()
    experiment = mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id).name
    out = Path(args.out or f"runs/rerun-{args.run_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"rerunning {args.run_id} ({run.info.run_name}) from its MLflow record into {out}")
    if args.local:
        from amdim.harness.local import train_local

        result = train_local(cfg, out, resume=False, probe=True, experiment=experiment)
    else:
        from amdim.harness.ray_train import train_ray

        cfg = with_overrides(cfg, {"train.device": "auto"})
        result = train_ray(
            cfg, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, experiment=experiment,
        )  # fmt: skip
    mlflow.MlflowClient(uri).set_tag(result["run_id"], "rerun_of", args.run_id)
    p = result["probe"]
    print(
        f"linear probe: test accuracy {p['test_accuracy']:.4f} after {result['epochs']} epochs; run {result['run_id']}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import compare, parse_formats, report

    formats = parse_formats(args.format)
    out = Path(args.out)
    if args.compare:
        info = compare(args.names, formats, out, args.metric)
    else:
        if len(args.names) != 1:
            raise UserError("give one study name, or several with --compare")
        info = report(args.names[0], formats, out, args.metric, args.baseline)
    for path in info["files"]:
        print(f"wrote {path}")
    if "online_offline_r" in info:
        print(f"online vs offline probe correlation r = {info['online_offline_r']:.3f}")
    if not args.compare and info.get("reference") is None:
        print(
            "no verdicts: the study has no labelled setting to compare against (--baseline LABEL names one)"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amdim",
        description="AMDIM self-supervised learning: train and probe models, run ablation studies on "
        "Ray (Tune + Optuna + ASHA), record them in MLflow and report them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train AMDIM, then run the offline linear probe")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (checkpoint.pt, metrics.json); default runs/train-...")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker, may be fractional")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    p.add_argument("--experiment", default="amdim", help="MLflow experiment name")
    p.add_argument(
        "--no-track",
        action="store_true",
        help="with --local: record nothing in MLflow (a torch-only machine)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--no-probe", action="store_true", help="skip the offline linear probe")
    p.add_argument("--smoke-test", action="store_true", help="one epoch of two steps, a 2-epoch probe")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print every config key with its value")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="list the preset names")
    p.add_argument("--json", action="store_true", help="print the flat config as JSON")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("probe", help="offline linear probe of a checkpoint's frozen encoder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint.pt")
    which.add_argument("--run", metavar="RUN_ID", help="the MLflow run whose final checkpoint to probe")
    p.add_argument("--data", help="data spec (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a probe.* or data.* config key for the probe (e.g. probe.epochs=50)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("segment", help="write mixture-component maps over test images as a PNG grid")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint.pt")
    which.add_argument("--run", metavar="RUN_ID", help="the MLflow run whose final checkpoint to use")
    p.add_argument("--data", help="data spec (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("ui", help="serve the MLflow UI on the tracking store (127.0.0.1 by default)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "dashboard", help="optuna-dashboard on a study's Optuna database (127.0.0.1 by default)"
    )
    p.add_argument("name", help="the study's name")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("study", help="hyperparameter studies: Ray Tune + Optuna + ASHA, tracked in MLflow")
    ssub = p.add_subparsers(dest="study_command", required=True)
    q = ssub.add_parser("run", help="start a study from a spec, or continue it if it exists")
    q.add_argument("spec", help="study spec YAML (see studies/)")
    q.add_argument("--smoke-test", action="store_true", help="same space, tiny model/data/budget")
    q.add_argument("--data", help="data spec for the base config (overrides the spec's)")
    q.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key of the base config, for every trial (see `amdim config`)",
    )  # fmt: skip
    q.add_argument(
        "--spec-set", dest="spec_sets", action="append", default=[], metavar="FIELD=VALUE",
        help="override a spec field: budget.trials=12, scheduler.type=none, name=NAME, base.preset=tiny, ...",
    )  # fmt: skip
    q = ssub.add_parser("export", help="copy the best configuration's checkpoint, config and run id out")
    q.add_argument("name", help="the study's name")
    q.add_argument("--out", required=True, help="folder for checkpoint.pt, config.json and export.json")
    q = ssub.add_parser("resume", help="continue a study after its driver stopped")
    q.add_argument("name", help="the study's name")
    q = ssub.add_parser("status", help="each stage's state, trials by state, and the best so far")
    q.add_argument("name", help="the study's name")
    q.add_argument("--json", action="store_true", help="print the status as JSON")
    ssub.add_parser("list", help="every study in the storage root, with its stages' states")
    q = ssub.add_parser(
        "confirm", help="rerun the K best configurations (or every labelled setting) with S new seeds each"
    )
    q.add_argument("name", help="the study's name")
    q.add_argument("--top", type=int, default=None, help="configurations (default: the spec's confirm.top)")
    q.add_argument("--seeds", type=int, default=None, help="seeds each (default: the spec's confirm.seeds)")
    q.add_argument(
        "--settings", action="store_true",
        help="rerun every labelled setting of the spec (its points: the paper's ablation cells) instead; "
        "with --top N, the N best configurations and every labelled setting",
    )  # fmt: skip
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="tables (csv, md, tex) and plots of a study, or several with --compare")
    p.add_argument(
        "names", nargs="+", metavar="NAME", help="the study (or, with --compare, studies) to report"
    )
    p.add_argument("--format", default="csv,md,tex", help="comma-separated: csv, md, tex")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--compare", action="store_true", help="one table across the named studies")
    p.add_argument(
        "--baseline", metavar="LABEL",
        help="the labelled setting the verdicts compare every other setting with (default: the spec's first point)",
    )  # fmt: skip
    p.add_argument(
        "--metric", default="probe_test_accuracy", choices=["probe_test_accuracy", "probe_val_accuracy"],
        help="the offline probe's accuracy the tables rank and compare on: on the test images "
        "(default, what a paper reports) or on the probe's validation split of the training images",
    )  # fmt: skip
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("rerun", help="train a recorded run again from its MLflow record alone")
    p.add_argument("run_id", help="the MLflow run id")
    p.add_argument("--out", help="output folder (default runs/rerun-...)")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker, may be fractional")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("bench", help="time the training step (vs an fp32 eager baseline) and the data path")
    _add_config_args(p)
    p.add_argument("--batch-size", type=int, required=True, help="images per step")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--steps", type=int, default=10, help="timed iterations of each measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline timings")
    p.add_argument(
        "--peak-tflops", type=float, default=None,
        help="the device's dense bf16 peak, TFLOP/s, for fraction_of_bf16_peak (default: by GPU name)",
    )  # fmt: skip
    p.add_argument("--smoke-test", action="store_true", help="2 timed steps after 1 warm-up step")
    p.add_argument(
        "--concurrent", default=None, metavar="N,N,...",
        help="instead: N processes training at once on the one device, for each N (e.g. 1,2,4): "
        "trials sharing a GPU, summed images/s",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    # MLflow sets its loggers' level when imported (later, lazily); this is the level it reads then.
    # Not "Creating initial MLflow database tables" or "Started monitoring system metrics" on every run.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Nor, with a tracking server, a "View run ... at: URL" line (and a request) per ended run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "mlflow" in sys.modules:  # imported already (amdim called from Python): set it directly
        import logging

        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DivergedError as exc:
        print(f"amdim: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except UserError as exc:
        print(f"amdim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("amdim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`amdim config | head`): stop quietly, as Unix tools do
        # Python would report the pipe again when it flushes stdout at exit: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
