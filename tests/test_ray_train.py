"""Ray Train path end to end: a real local Ray, gloo workers, a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch

from amdim import cli
from amdim.config import preset, to_flat, with_overrides

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset.npz"
FAST = {
    "train.epochs": 2,
    "train.max_steps_per_epoch": 4,
    "data.batch_size": 32,
    "probe.epochs": 5,
    "train.log_every": 1000,
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh runs folder (and so a fresh SQLite MLflow store) for each test."""
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from amdim.harness.raycluster import set_driver_env

    set_driver_env()
    return tmp_path


def _read_run(run_id: str):
    from amdim.harness.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    return client, client.get_run(run_id)


def _train(spec: str, out: Path, **extra):
    from amdim.harness.ray_train import train_ray

    cfg = with_overrides(preset("tiny"), {**FAST, "data.spec": spec, **extra})
    return cfg, train_ray(cfg, out, workers=2, cpus_per_worker=1, experiment="test-ray")


@pytest.mark.parametrize(
    "cpus, threads", [(None, None), (0.25, 1), (0.75, 1), (1, 1), (1.75, 2), (2, 2), (3.5, 4)]
)
def test_worker_threads_round_the_cpu_reservation(cpus, threads):
    from amdim.harness.trial import worker_threads

    assert worker_threads(cpus) == (threads or max(1, torch.get_num_threads()))


@pytest.mark.parametrize(
    "spec",
    ["synthetic", pytest.param(f"npz:{SUBSET}", marks=pytest.mark.slow)],
    ids=["synthetic", "cifar10-subset"],
)
def test_two_worker_run_survives_a_killed_worker_and_is_fully_recorded(store, monkeypatch, spec):
    """Also: the driver (this process) never queries CUDA, as on a CPU-only head (any query
    raises here), and the final evaluation runs on rank 0's worker, as its run records."""
    if spec.startswith("npz") and not SUBSET.exists():
        pytest.skip("shared CIFAR-10 subset not present")
    marker = store / "killed"
    monkeypatch.setenv("AMDIM_FAULT_INJECT", f"1:1:{marker}")  # SIGKILL rank 1 mid-way through epoch 2, once

    def hidden(*args, **kwargs):
        raise AssertionError("the driver queried CUDA")

    with pytest.MonkeyPatch.context() as cuda:
        for name in (
            "is_available",
            "device_count",
            "get_device_name",
            "current_device",
            "init",
            "get_rng_state",
        ):
            cuda.setattr(torch.cuda, name, hidden)
        cfg, summary = _train(spec, store / "out", **{"train.epochs": 3})
    assert marker.exists(), "the fault was not injected"
    assert (store / "out" / "checkpoint.pt").is_file() and (store / "out" / "metrics.json").is_file()
    assert summary["epochs"] == 3 and "probe" in summary
    client, run = _read_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    # The worker group was replaced and continued from the epoch-1 checkpoint.
    resumed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")}
    assert resumed == {1: 0, 2: 1, 3: 1}
    payload = torch.load(store / "out" / "checkpoint.pt", weights_only=True)
    assert payload["epoch"] == 3 and [h["epoch"] for h in payload["history"]] == [1, 2, 3]
    # Parameters are exactly the flat config the model was built from.
    expected = {k: str(v) for k, v in to_flat(cfg).items()}
    expected["train.device"] = "cpu"
    assert run.data.params == expected
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch once, the restart included
    for key in ("g2l_1t5", "g2l_1t7", "g2l_5t5", "reg", "test_acc_lin", "test_acc_mlp", "images_per_s", "lr"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    assert 0.0 <= run.data.metrics["probe_test_accuracy"] <= 1.0
    assert run.data.tags["probe_protocol"] == "linear-frozen-r1-v1"
    where, pid, device = run.data.tags["probe_ran_on"].split(", ")
    assert (where, device) == ("rank 0 worker", "cpu") and int(pid.split()[1]) != os.getpid()
    for tag in ("git_commit", "device", "dataset", "version.torch", "version.ray", "version.mlflow"):
        assert run.data.tags[tag], tag
    assert run.data.tags["device"].startswith("2x CPU")
    assert run.data.tags["torch_threads"] == "1"  # each worker holds 1 CPU
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "probe.json"} <= artifacts
    # The same record through the public search API the analysis layer uses.
    from amdim.harness.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    df = mlflow.search_runs(experiment_names=["test-ray"])
    assert (
        len(df) == 1 and float(df["metrics.probe_test_accuracy"].iloc[0]) == summary["probe"]["test_accuracy"]
    )
    assert df["params.loss.tclip"].iloc[0] == "20.0"
    # metrics.json, the run folder's summary, points at the same run.
    on_disk = json.loads((store / "out" / "metrics.json").read_text())
    assert on_disk["run_id"] == summary["run_id"] and on_disk["epochs"] == 3


def _one_step(config):
    """Ray worker: one DDP step of the real model on this rank's half of a fixed global batch."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from amdim.config import from_flat
    from amdim.distributed import all_gather_with_grad
    from amdim.model import AMDIM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_flat(config["flat"])
    torch.manual_seed(0)
    model = AMDIM(cfg.model, cfg.loss, 10).eval()  # eval: BN uses running stats, so the split is exact
    ddp = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    b = 8 // world
    sl = slice(rank * b, (rank + 1) * b)
    torch.manual_seed(5)  # same 5x5 location draw on every rank (each keeps its slice)
    out = ddp(x1[sl], x2[sl], y[sl], gather=all_gather_with_grad, rank_offset=rank * b)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": out["loss"].detach(), "grads": grads}, Path(config["dir"]) / f"rank{rank}.pt")


@pytest.mark.slow  # the DDP maths is checked without Ray in test_distributed; this adds Ray Train's gloo group
def test_two_workers_match_single_process_for_one_step(store, monkeypatch):
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from amdim.model import AMDIM

    cfg = preset("tiny")
    # Ray workers import _one_step from this file: put tests/ on their path.
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=2, logging_level="WARNING")
    try:
        TorchTrainer(
            _one_step,
            train_loop_config={"flat": to_flat(cfg), "dir": str(store)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=ray.train.RunConfig(name="onestep", storage_path=str(store / "ray")),
        ).fit()
    finally:
        ray.shutdown()
    ranks = [torch.load(store / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    model = AMDIM(cfg.model, cfg.loss, 10).eval()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(5)
    out = model(x1, x2, y)
    out["loss"].backward()

    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, out["loss"].detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        # DDP has already averaged the gradients: both ranks hold the global-batch gradient.
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--gpus-per-worker", "1"], {}, "no CUDA GPU"),
        (["--workers", str((os.cpu_count() or 1) + 1)], {}, "CPUs"),
        (["--workers", "2", "--gpus-per-worker", "0.5"], {}, "two DDP ranks on one GPU"),
        ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "does not answer"),
        (["--workers", "3", "--set", "data.batch_size=32"], {}, "divide"),
        (["--data", "npz:/nonexistent/cifar.npz"], {}, "no such file"),
        (["--local", "--set", "train.device=cuda"], {}, "no CUDA GPU"),
        (["--local", "--data", "npz:/nonexistent/cifar.npz"], {}, "no such file"),
    ],
)
def test_bad_requests_fail_in_one_line_before_any_work(store, monkeypatch, capsys, args, env, message):
    if "divide" in message and (os.cpu_count() or 1) < 3:
        args = ["--workers", "3", "--cpus-per-worker", "0.5", "--set", "data.batch_size=32"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if torch.cuda.is_available() and "GPU" in message:
        pytest.skip("this machine has a GPU")
    out = store / "out"
    rc = cli.main(["train", "--preset", "tiny", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists() and not (store / "runs" / "mlflow.db").exists()  # nothing written


def test_ui_command_points_at_the_store(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cli.main(["ui"]) == 2
    assert "does not answer" in capsys.readouterr().err


def test_a_diverged_ray_train_run_exits_3_and_leaves_no_result(store, monkeypatch, capsys):
    """Under Train V2 a job's result holds its last checkpointed report, never the diverged one:
    the divergence is read from what rank 0 recorded on the run, and the command ends as the
    local path does (exit 3, one line, diverged.json, no checkpoint.pt, the run FAILED)."""
    from test_divergence import DIVERGES

    out = store / "out"
    sets = {**FAST, **DIVERGES, "data.spec": "synthetic:n_train=256,n_test=64", "probe.epochs": 2}
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={'off' if v is None else v}")]
    rc = cli.main(
        ["train", "--preset", "tiny", "--workers", "2", "--cpus-per-worker", "1", "--out", str(out), *flags]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 3, err
    # Ray forwards its workers' log lines to stderr; amdim's own message is one line, the last.
    ours = [line for line in err.splitlines() if line.startswith("amdim:")]
    assert ours == [err.splitlines()[-1]]
    assert ours[0].startswith("amdim: error: training diverged: the loss is not finite at epoch 1, step")
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 1
    from amdim.harness.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("amdim").experiment_id])
    assert [(r.data.tags.get("state"), r.info.status) for r in runs] == [("diverged", "FAILED")]
    assert "probe_test_accuracy" not in runs[0].data.metrics
