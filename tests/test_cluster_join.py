"""Clusters a study joins as they are, started on this machine the way a user starts them.

* A ``ray start --head`` with Ray 2.60's token authentication: `RAY_ADDRESS=auto amdim study run`
  (Tune path) and `amdim train --workers 2` (Train path) join it with the token Ray finds in
  ``~/.ray/auth_token``, without the user setting ``RAY_AUTH_MODE``.
* An autoscaling cluster, from Ray's fake node provider (``fake_multinode``: node types "launched"
  as extra raylets on this machine, as ``../shared/docs/ray-notes.md`` section 10 describes): a
  CPU-only head and a GPU node type with ``min_workers: 0``, ``max_workers: 2``, its launcher
  config where ``ray up`` leaves it (``~/ray_bootstrap_config.yaml``). A study whose trials ask for
  one GPU each (and train on the CPU: the GPUs are logical) makes the autoscaler add GPU nodes,
  runs its trials there and completes; its driver never queries CUDA.

Slow: each starts a cluster and runs a study (about 1-2 minutes each on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import optuna
import pytest
import yaml
from ray_nodes import RAY, Nodes, free_port
from subprocess_env import ROOT, clean_env, run_amdim

pytestmark = pytest.mark.slow

SMOKE_TEST_SIZE = ["--data", "synthetic:n_train=1024,n_test=256", "--set", "train.max_steps_per_epoch=16"]


def _children(uri: str, sdir, name: str):
    state = json.loads((sdir / "state.json").read_text())
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    )


def test_a_token_authenticated_cluster_is_joined_as_it_is(tmp_path):
    runs, home = tmp_path / "runs", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in clean_env(runs).items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    nodes = Nodes(tmp_path, env)
    port = free_port()
    try:
        nodes.start(
            "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
            f"--dashboard-port={free_port()}", env={**nodes.env, "RAY_AUTH_MODE": "token"},
        )  # fmt: skip
        nodes.wait("auto", 1)
        joined = {**nodes.env, "RAY_ADDRESS": "auto"}
        # What a user met before: told to turn authentication off, the driver cannot join; now in one line.
        refused = run_amdim(
            runs, "study", "run", "studies/smoke.yaml", env={**joined, "RAY_AUTH_MODE": "disabled"}
        )
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines()[-1].startswith("amdim: error: cannot join the Ray cluster")
        study = run_amdim(
            runs, "study", "run", "studies/smoke.yaml", *SMOKE_TEST_SIZE, env=joined, timeout=600
        )
        assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
        trials = optuna.load_study(
            study_name="smoke", storage=f"sqlite:///{runs / 'studies' / 'smoke' / 'optuna.db'}"
        ).trials
        assert len(trials) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        out = tmp_path / "train-out"
        train = run_amdim(
            runs, "train", "--preset", "tiny", "--workers", "2", "--cpus-per-worker", "0.5", "--epochs", "1",
            "--data", "synthetic:n_train=256,n_test=64", "--set", "train.max_steps_per_epoch=2",
            "--set", "probe.epochs=2", "--out", str(out), env=joined, timeout=600,
        )  # fmt: skip
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    finally:
        nodes.stop()


def _fake_cluster_config(gcs: str) -> dict:
    """A launcher config for Ray's fake node provider: a CPU-only head and up to two one-GPU nodes."""
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands",
                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
    return {
        "cluster_name": "fake",
        "max_workers": 2,
        # Nothing to set up on a fake node: without these the autoscaler runs its updater (ssh and
        # setup commands) on each new node, which fails, and terminates the node ("launch failed").
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "idle_timeout_minutes": 5,
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }


def test_a_gpu_study_scales_up_an_autoscaling_cluster(tmp_path):
    runs, home, shared = tmp_path / "runs", tmp_path / "home", tmp_path / "shared"
    home.mkdir()
    env = {**clean_env(runs), "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    nodes = Nodes(tmp_path, env)
    port = free_port()
    ip = subprocess.run(
        [sys.executable, "-c", "import ray.util; print(ray.util.get_node_ip_address())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    config = home / "ray_bootstrap_config.yaml"  # where `ray up` leaves it on the head
    config.write_text(yaml.safe_dump(_fake_cluster_config(f"{ip}:{port}")))
    try:
        nodes.start(
            "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", f"--autoscaling-config={config}",
            "--include-dashboard=true", f"--dashboard-port={free_port()}",
            env={**nodes.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        )  # fmt: skip
        nodes.wait("auto", 1)
        spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
        spec["name"] = "gpu-smoke"
        spec["budget"]["gpus_per_worker"] = 1  # no GPU is up when the study starts
        spec_path = tmp_path / "gpu-smoke.yaml"
        spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        joined = {**nodes.env, "RAY_ADDRESS": "auto", "AMDIM_STORAGE": str(shared)}
        proc = run_amdim(
            runs, "study", "run", str(spec_path), *SMOKE_TEST_SIZE, "--set", "train.device=cpu",
            env=joined, hide_cuda=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "0 GPUs on 1 node(s) now; autoscaling up to" in proc.stdout and "2x gpu_node" in proc.stdout
        assert "2 at a time" in proc.stdout  # two GPU nodes at most, one trial each
        sdir = shared / "gpu-smoke"
        trials = optuna.load_study(study_name="gpu-smoke", storage=f"sqlite:///{sdir / 'optuna.db'}").trials
        assert len(trials) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        children = _children(f"sqlite:///{runs / 'mlflow.db'}", sdir, "gpu-smoke")
        assert len(children) == 6
        fake = {r.data.tags["worker_node"] for r in children}
        # The fake provider names the nodes it adds fff...0001, fff...0002: every trial ran on one.
        assert fake and all(node.startswith("ffffffffffffffff") for node in fake), fake
        assert all(r.data.tags["state"] in ("complete", "early_stopped") for r in children)
    finally:
        nodes.stop()
