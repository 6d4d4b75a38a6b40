"""A second local Ray instance on one machine is refused in one line, before anything is recorded.

Two instances started by ``ray.init()`` make Ray Train's helper processes find both and refuse to
choose, and the trials then hang until their worker groups time out. Here a real Ray instance is
held by another process while `amdim train` and `amdim study run` start as a user types them.
"""

from __future__ import annotations

import subprocess
import sys
import time

from subprocess_env import clean_env, run_amdim

from amdim.harness.raycluster import other_local_ray

HOLD = (
    "import sys, ray; ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR'); "
    "print('up', flush=True); sys.stdin.read(); ray.shutdown()"
)


def test_second_local_ray_is_refused_while_another_runs(tmp_path):
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        env=clean_env(runs),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "up"
        assert other_local_ray(), "the held instance is not visible"
        for args in (
            ("train", "--preset", "tiny", "--epochs", "1", "--out", str(tmp_path / "out")),
            ("study", "run", "studies/smoke.yaml"),
        ):
            proc = run_amdim(runs, *args, timeout=180, extra_env={"AMDIM_RAY_WAIT_S": "2"})
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert len(err) == 1 and "another local Ray instance is running" in err[0], err
            assert "RAY_ADDRESS=auto" in err[0]
        assert not (runs / "studies" / "smoke").exists()  # the study wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    deadline = time.monotonic() + 60
    while other_local_ray() and time.monotonic() < deadline:
        time.sleep(1)
    assert not other_local_ray(), "the held instance did not go away"
