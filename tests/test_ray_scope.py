"""The local Ray a study starts: its trial actors run in the workers Ray prestarted, and its
shutdown stops every process it started, the autoscaler monitor first.

A real local Ray, started the way `amdim study run` starts it (``study._RayScope``). These tests
read process ids from /proc: Linux only, as the project is.
"""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from ray._private import ray_constants  # noqa: E402
from ray._private import worker as ray_worker  # noqa: E402
from ray.tune.execution.class_cache import _ActorClassCache  # noqa: E402

from amdim.harness import study  # noqa: E402


def _idle_workers() -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::IDLE"):
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _trainable_class():
    """Stands for the trainable class Tune registers for a study's trial function (defined in a
    function, so that Ray ships it by value: this test module is not importable in a worker)."""

    class Trainable:
        def env(self, key: str) -> tuple[int, str | None]:
            return os.getpid(), os.environ.get(key)

    return Trainable


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    scope = study._RayScope(lean=True)
    with scope:
        yield scope


def test_trial_actors_run_in_prestarted_workers_without_a_runtime_env(local_ray):
    assert local_ray.started and local_ray.inherited is not None
    # Tune on its own gives the actor a runtime env (so a new worker process, not a prestarted one).
    trainable = _trainable_class()
    tune_own = _ActorClassCache().get(trainable)
    assert tune_own._default_options["runtime_env"]["env_vars"]["PL_DISABLE_FORK"] == "1"

    deadline = time.monotonic() + 30
    while len(idle := _idle_workers()) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert idle, "Ray prestarted no worker"
    tune_get = _ActorClassCache.get
    with study._trial_actors_inherit_env(local_ray.inherited):
        remote_cls = _ActorClassCache().get(trainable)
    assert "runtime_env" not in remote_cls._default_options
    assert _ActorClassCache.get is tune_get  # Tune's own again after the study
    actor = remote_cls.options(num_cpus=0.5).remote()
    pid, value = ray.get(actor.env.remote("PL_DISABLE_FORK"))
    assert value == "1"  # inherited from the driver, as Tune's runtime env would have set it
    assert pid in idle, f"the actor got a new process {pid}, not one of the prestarted workers {sorted(idle)}"
    ray.kill(actor)


def test_runtime_env_kept_when_a_variable_differs_from_the_inherited_one(local_ray, monkeypatch):
    trainable = _trainable_class()
    # A Train variable Tune copies from the driver, changed after Ray started: only the runtime env
    # can carry it to the actor.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.7")
    with study._trial_actors_inherit_env(local_ray.inherited):
        remote_cls = _ActorClassCache().get(trainable)
    assert (
        remote_cls._default_options["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.7"
    )
    actor = remote_cls.options(num_cpus=0.5).remote()
    assert ray.get(actor.env.remote("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))[1] == "0.7"
    ray.kill(actor)


def test_joined_ray_keeps_tunes_runtime_env():
    trainable = _trainable_class()
    with study._trial_actors_inherit_env(None):
        remote_cls = _ActorClassCache().get(trainable)
    assert "runtime_env" in remote_cls._default_options


def test_shutdown_stops_every_process_it_started(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with study._RayScope(lean=True):
        node = ray_worker._global_node
        # The shortcut in shutdown_ray acts on this Ray: it has a live autoscaler monitor.
        monitors = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]
        assert monitors and monitors[0].process.poll() is None
        pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
        assert len(pids) >= 4
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes still running after the study's shutdown: {left}"


def test_work_beside_the_start_runs_in_another_thread_and_is_done_when_ray_is_up(monkeypatch):
    import threading

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        seen["ray_up_at_start"] = ray.is_initialized()
        time.sleep(0.5)  # longer than nothing: the scope must wait for it
        seen["done"] = True

    with study._RayScope(lean=True, while_starting=work):
        assert seen.get("done"), "the scope returned before the work beside Ray's start had ended"
        assert seen["thread"] is not threading.main_thread()
        assert seen["ray_up_at_start"] is False  # it ran while Ray was starting, not after
