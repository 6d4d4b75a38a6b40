"""A real two-node Ray cluster on one machine: `ray start --head` plus `ray start --address` on
loopback, the second node carrying a custom resource that stands in for a GPU node. The smoke study
runs against it with its trial drivers pinned to the head and its Train workers to the "GPU" node,
so every trial spans both nodes; all results and MLflow runs must arrive. Both nodes are stopped
afterwards (their process groups are killed; `ray stop` would also kill unrelated Ray instances).

Slow (about 3 minutes on 2 cores): `./dev test -m slow tests/test_two_node.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from ray_nodes import Nodes, free_port
from subprocess_env import clean_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    return {**clean_env(tmp / "runs"), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-node")
    port, dash = free_port(), free_port()
    env = _env(tmp)
    nodes = Nodes(tmp, env)
    env = nodes.env
    t0 = time.perf_counter()
    nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                '--resources={"head": 1}', "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                "--include-dashboard=true")  # fmt: skip
    address = f"127.0.0.1:{port}"
    nodes.wait(address, 1)
    nodes.start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                '--resources={"gpu_node": 2}')  # fmt: skip
    nodes.wait(address, 2)
    started = time.perf_counter() - t0
    try:
        yield tmp, address, env, started
    finally:
        nodes.stop()


def _spec(tmp: Path, launcher: str = "train") -> Path:
    """The smoke study with its training pinned to the second node ("gpu_node"): on the Train
    path with the trial drivers pinned to the head, on the Tune path (no separate driver) the
    trial actors, which train, on the second node."""
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    spec["name"] = f"smoke-two-node-{launcher}"
    spec["base"]["data"] = "synthetic:n_train=1024,n_test=256"  # the smoke spec's test size
    spec["base"]["set"]["train.max_steps_per_epoch"] = 16
    spec["budget"].update({"max_concurrent": 2, "worker_resources": {"gpu_node": 1}, "launcher": launcher})
    if launcher == "train":
        spec["budget"]["driver_resources"] = {"head": 0.01}
    path = tmp / f"two-node-{launcher}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_study_refuses_a_multi_node_cluster_without_shared_storage(cluster):
    tmp, address, env, _ = cluster
    proc = subprocess.run(
        [sys.executable, "-m", "amdim.cli", "study", "run", str(_spec(tmp))],
        cwd=ROOT, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "AMDIM_STORAGE is not set" in err, err
    assert not (tmp / "runs" / "mlflow.db").exists()


@pytest.mark.parametrize("launcher", ["train", "tune"])
def test_smoke_study_spans_both_nodes(cluster, launcher):
    tmp, address, env, started = cluster
    storage = tmp / "shared"
    name = f"smoke-two-node-{launcher}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "amdim.cli", "study", "run", str(_spec(tmp, launcher))],
        cwd=ROOT, env={**env, "RAY_ADDRESS": address, "AMDIM_STORAGE": str(storage)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 node(s)" in proc.stdout
    print(f"\ntwo-node cluster start {started:.1f} s; smoke study {wall:.1f} s")

    sdir = storage / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sdir / 'optuna.db'}")
    n = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())["budget"]["trials"]
    assert len(study.trials) == n
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)

    code = f"import ray, json; ray.init(address={address!r}, logging_level='ERROR'); print(json.dumps([[x['NodeID'], x['Resources']] for x in ray.nodes() if x['Alive']]))"
    nodes = json.loads(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    head = next(nid for nid, res in nodes if "head" in res)
    gpu = next(nid for nid, res in nodes if "gpu_node" in res)

    state = json.loads((sdir / "state.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    exp = client.get_experiment_by_name(name)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    )
    assert len(children) == n
    for run in children:
        assert run.data.tags["trial_path"] == launcher
        # On the Train path the trial's Tune driver ran on the head and its Train worker on the
        # "GPU" node; on the Tune path the trial's actor, which trains, on the "GPU" node.
        assert run.data.tags["driver_node"] == (head if launcher == "train" else gpu)
        assert run.data.tags["worker_node"] == gpu
        assert run.data.tags["state"] in ("complete", "early_stopped")
        assert Path(run.data.tags["checkpoint_path"]).is_relative_to(sdir)  # results on shared storage
        if run.data.tags["state"] == "complete":
            assert "probe_test_accuracy" in run.data.metrics
