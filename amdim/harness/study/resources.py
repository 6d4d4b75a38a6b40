"""What one study trial holds at once, and how many trials a cluster holds: pure arithmetic over
the spec's budget and the nodes (:class:`amdim.harness.raycluster.NodeType`)."""

from __future__ import annotations

from typing import Any

from amdim.harness.study_spec import SpecError, StudySpec

DRIVER_CPU = 0.25  # a Train-path trial's driver only waits on its Train run; workers hold the real resources


def trial_bundles(spec: StudySpec) -> list[tuple[str, dict[str, float], int]]:
    """What one trial holds at once, as ``(what, bundle, count)``: each bundle must fit on one node.
    On the Tune path the trial's one actor, which trains; on the Train path its waiting driver
    actor and its Train workers."""
    b = spec.budget
    worker = {
        "CPU": b.cpus_per_worker,
        **({"GPU": b.gpus_per_worker} if b.gpus_per_worker else {}),
        **dict(b.worker_resources),
    }
    if b.path == "tune":
        return [("worker", worker, 1)]
    return [("driver", actor_resources(spec), 1), ("worker", worker, b.workers)]


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """Everything one trial holds at once, summed over its bundles."""
    need: dict[str, float] = {}
    for _, bundle, count in trial_bundles(spec):
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + count * amount
    return need


def actor_resources(spec: StudySpec) -> dict[str, float]:
    """What the trial's Tune actor reserves: the whole trial on the Tune path, only the waiting
    driver (``DRIVER_CPU`` and ``driver_resources``) on the Train path."""
    if spec.budget.path == "train":
        return {"CPU": DRIVER_CPU, **dict(spec.budget.driver_resources)}
    return trial_bundles(spec)[0][1]


def concurrency(spec: StudySpec, nodes: list[Any], where: str = "the cluster") -> int:
    """How many trials the nodes (:class:`amdim.harness.raycluster.NodeType`: now, or all an
    autoscaler may add) hold at once, each bundle of a trial on one node; capped by
    ``budget.max_concurrent`` and ``budget.trials``.

    Raises SpecError, in one line naming the field and the amounts, when no node can ever hold a
    bundle of the trial, or the nodes together never hold one whole trial.
    """
    from amdim.harness.raycluster import fits, slots

    b = spec.budget
    n = spec.budget.trials
    for what, bundle, count in trial_bundles(spec):
        if not any(fits(bundle, t.resources) for t in nodes):
            for name, amount in bundle.items():
                largest = max((t.resources.get(name, 0.0) for t in nodes), default=0.0)
                if amount > largest + 1e-9:
                    field = (
                        {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}.get(name, "worker_resources")
                        if what == "worker"
                        else ("driver_resources" if name != "CPU" else "workers")
                    )
                    unit = f" {name}{'s' if name in ('CPU', 'GPU') else ''}"
                    per = (
                        " per worker"
                        if what == "worker"
                        else f" for its driver ({DRIVER_CPU:g} CPU + driver_resources)"
                    )
                    raise SpecError(
                        f"budget.{field}: a trial needs {amount:g}{unit}{per}, and no node of {where} has "
                        f"more than {largest:g}"
                    )
            raise SpecError(f"budget: no node of {where} holds one {what} of a trial ({bundle})")
        n = min(n, slots(bundle, nodes) // count)
    if n < 1:
        need = trial_resources(spec)
        raise SpecError(
            f"budget.workers: a trial needs {b.workers} workers of {trial_bundles(spec)[-1][1]}"
            f" ({', '.join(f'{v:g} {k}' for k, v in need.items() if v)} in all), more than {where} can hold"
        )
    if b.max_concurrent:
        n = min(n, b.max_concurrent)
    return max(1, n)
