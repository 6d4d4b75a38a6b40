"""The local Ray a study starts: the settings it starts with reach its workers, and its shutdown
stops every process it started. A real local Ray, started the way `amdim study run` starts it
(``study.RayScope``). Process ids are read with psutil."""

from __future__ import annotations

import os
import time

import psutil
import ray

from amdim.harness import study
from amdim.harness.raycluster import LOCAL_RAY_ENV, WORKER_ENV


def test_a_started_ray_gives_its_workers_the_studys_settings_and_stops_all_it_started(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in {**LOCAL_RAY_ENV, **WORKER_ENV}:
        monkeypatch.delenv(key, raising=False)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # earlier tests' helpers (multiprocessing's, ...)
    with study.RayScope(lean=True) as scope_ray:
        assert scope_ray.is_initialized()

        @ray.remote(num_cpus=0.5)
        def env(keys: list[str]) -> dict[str, str | None]:
            return {k: os.environ.get(k) for k in keys}

        keys = sorted({**LOCAL_RAY_ENV, **WORKER_ENV})
        assert ray.get(env.remote(keys)) == {k: {**LOCAL_RAY_ENV, **WORKER_ENV}[k] for k in keys}
        started = [p.pid for p in me.children(recursive=True) if p.pid not in before]
        assert len(started) >= 3  # the GCS, the raylet, workers, ...
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while (
        left := [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    ) and (time.monotonic() < deadline):
        time.sleep(0.2)
    assert not left, f"Ray processes still running after the study's shutdown: {left}"


def test_a_scope_inside_a_connected_process_leaves_ray_running(monkeypatch):
    """`amdim` called from a Python process already connected to Ray uses that connection and
    leaves it connected."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        with study.RayScope() as scope_ray:
            assert scope_ray.is_initialized()
        assert ray.is_initialized()
    finally:
        ray.shutdown()
