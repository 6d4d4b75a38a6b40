"""Wall-clock of ``amdim train`` through Ray Train versus ``--local``, in one run.

    python -m amdim.harness.bench_ray --preset tiny --epochs 3 --workers 1,2 [--set key=value ...]

Trains the same configuration in this process, then through a TorchTrainer with each worker
count, each recorded in MLflow, without the offline probe. For every run the overhead is its
wall-clock minus the time spent in training epochs; Ray's fixed start-up cost is a Ray run's
overhead minus the local run's (``ray.init`` is reported separately). Epoch times differ between
the paths for a second reason: a Ray worker reserving one CPU runs torch with one thread
(Ray sets ``OMP_NUM_THREADS`` to the worker's CPUs). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from amdim.config import parse_set_args, preset, to_flat, with_overrides
    from amdim.harness.local import train_local
    from amdim.harness.ray_train import train_ray
    from amdim.harness.raycluster import set_driver_env

    p = argparse.ArgumentParser(prog="python -m amdim.harness.bench_ray", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = with_overrides(
        preset(args.preset),
        {
            "data.spec": args.data,
            "train.epochs": args.epochs,
            "train.device": "cpu",
            **parse_set_args(args.overrides),
        },
    )
    set_driver_env()
    out = Path(tempfile.mkdtemp(prefix="amdim-bench-ray-"))
    os.environ.setdefault("AMDIM_RUNS_DIR", str(out / "runs"))
    result: dict = {
        "config": {
            k: v for k, v in to_flat(cfg).items() if k.startswith(("model.", "data.", "train.epochs"))
        },
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    t0 = time.perf_counter()
    local = train_local(
        cfg, out / "local", resume=False, probe=False, experiment="bench-ray", log=lambda _: None
    )
    result["local_s"] = time.perf_counter() - t0
    result["local_epoch_time_s"] = sum(h["epoch_time_s"] for h in local["history"])
    result["local_overhead_s"] = result["local_s"] - result["local_epoch_time_s"]
    for w in [int(x) for x in args.workers.split(",")]:
        t0 = time.perf_counter()
        summary = train_ray(
            cfg, out / f"ray-{w}", workers=w, cpus_per_worker=1, experiment="bench-ray", probe=False
        )
        wall = time.perf_counter() - t0
        result[f"ray_{w}w_s"] = wall
        result[f"ray_{w}w_ray_init_s"] = summary["ray_init_s"]
        result[f"ray_{w}w_fit_s"] = summary["fit_s"]
        epochs_s = sum(h["epoch_time_s"] for h in summary["history"])
        result[f"ray_{w}w_epoch_time_s"] = epochs_s
        result[f"ray_{w}w_fixed_startup_s"] = (wall - epochs_s) - result["local_overhead_s"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
