"""Cluster deployment: ``cluster.yaml`` checked with Ray's own launcher validation (offline, the
first two steps of ``ray up``), and ``scripts/tracking-server`` run for real against a temporary
SQLite store, with a run logged through it by :class:`amdim.harness.tracking.RunRecord`."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from amdim.errors import UserError
from amdim.harness import tracking

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
SCRIPT = ROOT / "scripts" / "tracking-server"


def _validate(raw: dict) -> dict:
    """What ``ray up`` does before it touches a cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    return _validate(raw)


# --- cluster.yaml ---------------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation_with_cpu_head_and_gpu_workers(cfg):
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["head"] == 1
    assert head["max_workers"] == 0  # filled in by prepare_config: the head type is never scaled
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker node type with a GPU"
    for t in gpu:
        assert 0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"]
    assert cfg["provider"]["type"] == "aws"


def test_setup_installs_the_project_at_the_pinned_versions(cfg):
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "ray==2.60.0" in pins and "mlflow==3.17.2" in pins
    assert cfg["file_mounts"]["~/amdim"] == "./"
    assert ".venv" in cfg["rsync_exclude"]
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        assert any("pip install" in c and "-c constraints.txt -e ." in c for c in cfg[key]), key


def test_worker_environment_points_at_shared_storage_and_head_tracking_server(cfg, tmp_path):
    # Run the environment step of the worker setup as the launcher would: RAY_HEAD_IP exported,
    # commands in a shell that sources ~/.bashrc. Run twice: `ray up` re-runs setup on every update.
    env_cmd = next(c for c in cfg["worker_setup_commands"] if "MLFLOW_TRACKING_URI" in c)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("case $- in *i*) ;; *) return;; esac\n")  # Ubuntu's early return
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.0.3.7"}
    for _ in range(2):
        subprocess.run(["bash", "-c", env_cmd], env=env, check=True, timeout=30)
    out = subprocess.run(
        ["bash", "-c", "source ~/.bashrc; env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert seen["MLFLOW_TRACKING_URI"] == "http://10.0.3.7:5000"
    assert seen["AMDIM_STORAGE"] == "/mnt/shared/amdim"
    assert seen["RAY_AUTH_MODE"] == "token"  # token auth stays on for the cluster
    assert (seen["RAY_JOB_STOP_SIGNAL"], seen["RAY_JOB_STOP_WAIT_TIME_S"]) == (
        "SIGINT",
        "60",
    )  # `ray job stop` = Ctrl-C
    assert seen["PATH"].startswith(f"{home}/amdim/.venv/bin:")
    assert (home / ".bashrc").read_text().count(". ~/.amdim-env") == 1
    # the shared path is mounted before setup runs
    assert any("/mnt/shared" in c and "mount" in c for c in cfg["initialization_commands"])


def test_start_commands_keep_dashboard_local_and_start_tracking_server(cfg):
    head = cfg["head_start_ray_commands"]
    start = [c for c in head if "ray start --head" in c]
    assert len(start) == 1 and "--dashboard-host=127.0.0.1" in start[0]
    assert any("scripts/tracking-server" in c and "--port 5000" in c and "--allowed-hosts" in c for c in head)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    everything = " ".join(str(v) for v in cfg.values())
    assert "RAY_AUTH_MODE=disabled" not in everything
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_every_launcher_command_is_valid_bash(cfg):
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cfg[key]:
            parsed = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
            assert parsed.returncode == 0, f"{key}: {cmd}\n{parsed.stderr}"


def _unknown_top_level_key(c):
    c["max_worker"] = 3


def _negative_max_workers(c):
    c["max_workers"] = -1


def _negative_gpu(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = -1


def _head_type_missing(c):
    c["head_node_type"] = "cpu_head"


def _min_workers_over_cluster_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "breaks",
    [
        _unknown_top_level_key,
        _negative_max_workers,
        _negative_gpu,
        _head_type_missing,
        _min_workers_over_cluster_max,
    ],
)
def test_ray_validation_rejects_a_broken_copy(raw, breaks):
    broken = copy.deepcopy(raw)
    breaks(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(broken)


# --- scripts/tracking-server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _script(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server(tmp_path, request):
    """A tracking server on a free port whose store is ``$AMDIM_STORAGE/mlflow`` in tmp_path; its
    whole process group is gone after the test, pass or fail."""
    if not shutil.which("setsid"):
        pytest.skip("scripts/tracking-server needs setsid (util-linux)")
    port = _free_port()
    storage = tmp_path / "storage"
    pid_file = tmp_path / "tracking-server.pid"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(AMDIM_STORAGE=str(storage), AMDIM_RUNS_DIR=str(tmp_path / "runs"))
    pgids: list[int] = []

    def cleanup():
        if pid_file.exists():
            pgids.append(int(pid_file.read_text()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                _script("stop", "--pid-file", str(pid_file), env=env, timeout=30)
        for pgid in pgids:  # backstop: whatever `stop` left behind
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)

    request.addfinalizer(cleanup)
    started = _script(
        "--host", "127.0.0.1", "--port", str(port), "--pid-file", str(pid_file), "--timeout", "90", env=env
    )
    assert started.returncode == 0, started.stdout + started.stderr
    pgids.append(int(pid_file.read_text()))
    return {
        "uri": f"http://127.0.0.1:{port}",
        "stdout": started.stdout,
        "storage": storage,
        "pid_file": pid_file,
        "pgid": pgids[0],
        "env": env,
    }


@pytest.mark.timeout(150)
def test_tracking_server_stores_runs_and_artifacts_and_stops(server, tmp_path, monkeypatch):
    uri = server["uri"]
    assert server["stdout"].strip().splitlines()[-1] == f"MLFLOW_TRACKING_URI={uri}"
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
        assert resp.status == 200
    db = server["storage"] / "mlflow" / "mlflow.db"
    artifacts = server["storage"] / "mlflow" / "artifacts"
    assert db.is_file()  # the SQLite backend, not the file store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == uri
    tracking.check_tracking(uri)
    record = tracking.RunRecord.create(
        uri, "cluster-test", "through-the-server", {"loss.tclip": 20.0, "model.ndf": 32}, {"kind": "test"}
    )
    record.log_metrics({"probe_test_accuracy": 0.25, "loss": 1.5}, step=3)
    probe = tmp_path / "probe.json"
    probe.write_text('{"protocol": "test"}\n')
    record.log_artifact(probe)
    record.finish()

    import mlflow

    run = mlflow.MlflowClient(uri).get_run(record.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"probe_test_accuracy": 0.25, "loss": 1.5}
    assert run.data.params == {"loss.tclip": "20.0", "model.ndf": "32"}
    assert run.data.tags["kind"] == "test"
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(record.run_id)] == ["probe.json"]
    stored = list(artifacts.rglob("probe.json"))  # uploaded through the server into its destination
    assert len(stored) == 1 and record.run_id in stored[0].parts
    assert stored[0].read_text() == probe.read_text()

    again = _script("--port", uri.rsplit(":", 1)[1], "--pid-file", str(server["pid_file"]), env=server["env"])
    assert again.returncode == 0 and "already running" in again.stderr

    stopped = _script("stop", "--pid-file", str(server["pid_file"]), env=server["env"], timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    assert not server["pid_file"].exists()
    deadline = time.monotonic() + 10
    while _group_alive(server["pgid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(server["pgid"]), "server processes left behind"
    with pytest.raises(UserError, match="does not answer"):
        tracking.check_tracking(uri, timeout=2)


def test_tracking_server_refuses_object_storage_without_a_database_uri(tmp_path):
    env = {**os.environ, "AMDIM_STORAGE": "s3://bucket/prefix", "AMDIM_RUNS_DIR": str(tmp_path)}
    out = _script("--pid-file", str(tmp_path / "ts.pid"), env=env, timeout=30)
    assert out.returncode == 1 and "--backend-store-uri" in out.stderr
    assert not (tmp_path / "ts.pid").exists()
    stop = _script("stop", "--pid-file", str(tmp_path / "ts.pid"), env=env, timeout=30)
    assert stop.returncode == 0 and "not running" in stop.stdout


def test_every_shipped_gpu_spec_fills_the_gpu_node_type_with_nothing_left_idle(cfg):
    """The GPU node type's CPUs and GPU run out together under every shipped spec's trials, and a
    study sees every node the autoscaler may add (the cluster starts with no GPU node)."""
    from amdim.harness.raycluster import autoscaling_node_types, fits
    from amdim.harness.study import concurrency
    from amdim.harness.study_spec import load_spec

    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0
    types = autoscaling_node_types(CLUSTER_YAML)  # as a study on the head reads ~/ray_bootstrap_config.yaml
    assert {t.name: t.count for t in types} == {"head": 1, "gpu_worker": gpu["max_workers"]}
    specs = [p for p in (ROOT / "studies").glob("*.yaml") if p.stem != "smoke"]
    assert specs
    for path in specs:
        spec = load_spec(path, {"data.spec": "synthetic"})
        b = spec.budget
        per_node = fits({"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker}, gpu["resources"])
        assert (
            per_node
            == gpu["resources"]["GPU"] / b.gpus_per_worker
            == gpu["resources"]["CPU"] / b.cpus_per_worker
        ), path
        assert concurrency(spec, types) == min(b.trials, per_node * gpu["max_workers"]), path
