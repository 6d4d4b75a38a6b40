"""Ray for a study or a Train run: start one on this machine or join a cluster as it is, and what
the cluster can hold, now or once its autoscaler has added every node it may add.

A Ray this process starts gets this project's settings for a single machine (no token
authentication: nothing but this process joins it; no usage report). A Ray it joins (``RAY_ADDRESS``,
or a ``ray start`` instance on this machine) keeps its own: its token authentication, its
environment. The settings this driver's own Tune and Train code read are set in this process
either way; those that trial actors read go to a joined cluster's workers as this job's runtime
environment (a started Ray's workers inherit them from this process).

Capacity: on a cluster whose autoscaler adds nodes when work asks for them (the cluster launcher's
``cluster.yaml``: GPU workers with ``min_workers: 0``), what is up at launch is not what a study can
use. The node types and their maximum counts come from the launcher's config (``ray up`` leaves it
on the head as ``~/ray_bootstrap_config.yaml``, the file Ray Tune also checks to tell an
autoscaling cluster; ``AMDIM_AUTOSCALING_CONFIG`` names another one). A trial is refused only when
no node type can ever hold it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amdim.errors import UserError

# Read by this process's own Tune and Train code (the study driver, `amdim train`), never by a
# cluster's processes; set here whatever Ray this process uses.
DRIVER_ENV = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # Study trials report the ranking metric (the offline probe) only in their last result.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0 the legacy reporter prints nothing; studies print their own lines
    # Tune adds CSV, JSON and TensorBoard loggers to every experiment unless told not to; the
    # TensorBoard one imports tensorboardX, which imports torch in the driver: about 2 s on 2 cores,
    # serial, before the first trial starts (docs/benchmarks.md). Studies add the CSV and JSON ones
    # themselves (study.py, _tuner); their record is MLflow.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
# Read inside the trial actors and Train workers.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a "View run ... at: URL" line per ended run
    # A reused trial actor waits this long for the previous trial's thread to end (default 2 s;
    # a thread still alive then fails the next trial). ASHA's stop ends it at once, inside its report.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",
}
# Only for a Ray this process starts on this machine.
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # 2.60 enables token auth and writes ~/.ray/auth_token otherwise
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_driver_env() -> None:
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)


def joins_a_cluster() -> bool:
    """Whether ``ray.init()`` here would join a running Ray (``RAY_ADDRESS``, or a ``ray start``
    instance on this machine) rather than start one."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    from amdim.harness._compat import local_ray_instances

    return local_ray_instances()[0]


def other_local_ray() -> list[str]:
    """GCS addresses of Ray instances already running on this machine that ``ray.init()`` would not
    join (started by another process's ``ray.init``, not by ``ray start``). Empty when there are none,
    or when a ``ray start`` cluster exists (``ray.init()`` joins that one)."""
    from amdim.harness._compat import local_ray_instances

    cluster, others = local_ray_instances()
    return [] if cluster else others


def init_ray(**kwargs: Any) -> bool:
    """``ray.init`` unless this process is connected already; returns whether it called it (and so
    should shut Ray down).

    Joining (``RAY_ADDRESS`` set, or a ``ray start`` instance here): the cluster's own settings, with
    :data:`WORKER_ENV` as this job's runtime environment (each key the job's environment does not
    set already: a ``ray job submit --runtime-env-json`` of the same key stays the user's).
    Starting: :data:`LOCAL_RAY_ENV` and :data:`WORKER_ENV` in this process's environment, which the
    new Ray's processes inherit. Two local Ray instances on one machine break Ray Train (its helper
    processes find both and refuse to choose), so a second local start is refused in one line
    while another instance runs; one that is shutting down (e.g. just after a killed study) gets
    ``AMDIM_RAY_WAIT_S`` (default 20) seconds to go away first.
    """
    import ray

    if ray.is_initialized():
        return False
    set_driver_env()
    if joins_a_cluster():
        env_vars = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        address = os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)
        except ConnectionError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            auth = (
                f"; RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} is set here: unset it to use the cluster's "
                "token authentication (~/.ray/auth_token, or RAY_AUTH_TOKEN)"
                if os.environ.get("RAY_AUTH_MODE") == "disabled"
                else ""
            )
            raise UserError(
                f"cannot join the Ray cluster at {address or 'this machine'}: {first}{auth}"
            ) from None
        return True
    deadline = time.monotonic() + float(os.environ.get("AMDIM_RAY_WAIT_S", "20"))
    while (others := other_local_ray()) and time.monotonic() < deadline:
        time.sleep(1.0)
    if others:
        raise UserError(
            f"another local Ray instance is running on this machine (GCS {others[0]}; another study or "
            "`amdim train`?), and two break Ray Train: wait for it to finish (`ray stop` ends a leftover "
            "one), or start one shared instance with `ray start --head` and run with RAY_ADDRESS=auto"
        )
    for key, value in {**LOCAL_RAY_ENV, **WORKER_ENV}.items():
        os.environ.setdefault(key, value)
    ray.init(**kwargs)
    return True


# --- capacity -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    """Nodes of one kind: the resources each holds and how many of them the cluster may have."""

    name: str
    resources: dict[str, float]
    count: int  # now (a live cluster) or at most (an autoscaler's node type)


def local_gpu_count() -> int:
    """GPUs a Ray started here would give its workers, counted as Ray counts them, without CUDA:
    ``CUDA_VISIBLE_DEVICES`` when set, else NVML's device count (the driver's management library:
    no CUDA context, no torch); 0 without an NVIDIA driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() not in ("-1", "NoDevFiles")])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver, no NVML: no GPU
        return 0


def this_machine() -> list[NodeType]:
    """A Ray this process would start: one node with this machine's CPUs and GPUs."""
    return [NodeType("this machine", {"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpu_count())}, 1)]


def live_nodes(ray) -> list[NodeType]:
    """The nodes of a connected cluster as they are now, one entry each."""
    return [
        NodeType(
            n.get("NodeManagerAddress", n["NodeID"][:8]), {k: float(v) for k, v in n["Resources"].items()}, 1
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def autoscaling_config_path() -> Path | None:
    """The cluster launcher's config of the cluster this process runs on: ``AMDIM_AUTOSCALING_CONFIG``,
    else ``~/ray_bootstrap_config.yaml`` where ``ray up`` puts it on the head; None without either."""
    env = os.environ.get("AMDIM_AUTOSCALING_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"AMDIM_AUTOSCALING_CONFIG={env}: no such file")
        return path
    path = Path("~/ray_bootstrap_config.yaml").expanduser()
    return path if path.is_file() else None


def autoscaling_node_types(path: Path) -> list[NodeType]:
    """Every node type of a cluster launcher config with the most nodes of it the autoscaler may
    run: the head once; each worker type up to its ``max_workers``, within the config's global
    ``max_workers``. One line naming the file for a config without explicit node types."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
        types, head = config["available_node_types"], config["head_node_type"]
        cap = int(config.get("max_workers", 2))  # the launcher's own default
        out = []
        for name, spec in types.items():
            resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
            count = 1 if name == head else min(int(spec.get("max_workers", cap)), cap)
            out.append(NodeType(name, resources, count))
        return out
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(
            f"{path}: not a cluster launcher config with available_node_types and head_node_type ({exc})"
        ) from None


def fits(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many ``bundle``s one node of resources ``node`` holds at once."""
    needs = [(k, v) for k, v in bundle.items() if v > 0]
    if not needs:
        return 0
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in needs)


def slots(bundle: dict[str, float], nodes: Iterable[NodeType]) -> int:
    """How many ``bundle``s the nodes hold at once, each bundle on one node."""
    return sum(t.count * fits(bundle, t.resources) for t in nodes)
