"""Ray clusters that the tests start on this machine the way a user starts one: `ray start` nodes,
each in its own process group (so that teardown stops exactly these processes; `ray stop` would
stop every Ray instance on the machine), under their own ``RAY_TMPDIR`` (a short one: Ray's session
sockets must fit AF_UNIX's 107-byte path limit). A client given :attr:`Nodes.env` finds the cluster
with ``RAY_ADDRESS=auto``; Ray instances started elsewhere never see it as theirs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """``ray start --block`` processes of one cluster; :meth:`stop` kills them and what they started."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.temp = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        self.logs, self.env = logs, {**env, "RAY_TMPDIR": str(self.temp)}
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", *args],
            env=env or self.env,
            stdout=open(self.logs / f"node{len(self.procs)}.log", "w"),  # noqa: SIM115 (open for the node's life)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def wait(self, address: str, n: int, env: dict[str, str] | None = None, timeout: float = 90) -> None:
        """Until ``n`` nodes are alive (a client on ``address`` counts them)."""
        code = (
            f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            with contextlib.suppress(subprocess.TimeoutExpired):
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    env=env or self.env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                    return
            time.sleep(1)
        raise AssertionError(f"the cluster at {address} did not reach {n} nodes: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join(p.read_text()[-800:] for p in sorted(self.logs.glob("node*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        left = subprocess.run(["pgrep", "-f", str(self.temp)], capture_output=True, text=True).stdout.split()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
