"""Study specs: the YAML a researcher writes to launch a search, parsed and validated in one place.

A spec names a base training configuration (a preset plus flat overrides), a search space over
flat config keys, the objective, the budget, the scheduler, the sampler and the confirm stage::

    name: nce
    base: {preset: cifar, data: "cifar10:data/cifar10", set: {train.epochs: 100, data.online_val_fraction: 0.1}}
    search:
      loss.reg_weight: {type: float, low: 0.0, high: 0.2}
      loss.tclip: {type: choice, values: [5.0, 10.0, 20.0, "off"]}
    points:                                  # evaluated first (paper settings), labelled
      - {label: "λ = 0", loss.reg_weight: 0.0}
    objective: {online: val_acc_lin, rank: probe_val_accuracy}   # val_: needs data.online_val_fraction
    budget: {trials: 24, epochs: 100, max_concurrent: 8, workers: 1, cpus_per_worker: 4, gpus_per_worker: 0.5}
    scheduler: {type: asha, grace_period: 10, reduction_factor: 3}
    sampler: {type: tpe, seed: 0, n_startup_trials: 10}
    confirm: {top: 3, seeds: 3}

Everything is checked before Ray starts: every mistake is a :class:`SpecError` whose one line
names the field (``search.loss.tclip.low``) and the problem. This module imports no Ray, Optuna
or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amdim.config import (
    Config,
    _field_types,
    _parse_scalar,
    _section_classes,
    absolute_spec,
    preset,
    to_flat,
    with_overrides,
)
from amdim.errors import ConfigError, UserError


class SpecError(UserError):
    """A study spec that cannot run; the message names the field."""


ONLINE_METRICS = {  # per-epoch metrics the trainer reports, and which way is better
    "val_acc_lin": "max",  # the online probes on data.online_val_fraction of the training set
    "val_acc_mlp": "max",
    "test_acc_lin": "max",  # the paper's online evaluation: on the test set
    "test_acc_mlp": "max",
    "val_acc_knn": "max",  # weighted kNN on the same split (amdim.signals)
    "rankme": "max",  # effective rank of the split's features: label-free
    "train_acc_lin": "max",
    "loss": "min",
    "loss_nce": "min",
}
NEEDS_SPLIT = ("val_acc_lin", "val_acc_mlp", "val_acc_knn", "rankme")  # computed on the online val split
RANK_METRICS = ("probe_val_accuracy", "probe_test_accuracy")
SAMPLERS = ("tpe", "random", "grid")
LAUNCHERS = ("auto", "tune", "train")
SCHEDULERS = ("asha", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Param:
    """One searched flat config key: ``float``/``int`` ranges (optionally log) or ``choice``."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    values: tuple[Any, ...] = ()

    def grid_values(self) -> list[Any]:
        if self.type == "choice":
            return list(self.values)
        assert self.type == "int" and self.low is not None and self.high is not None
        return list(range(int(self.low), int(self.high) + 1, self.step or 1))

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        if value is None or isinstance(value, (bool, str)):
            return False
        ok = self.low <= value <= self.high  # type: ignore[operator]
        if self.type == "int":
            ok = ok and float(value).is_integer() and (int(value) - int(self.low)) % (self.step or 1) == 0
        return ok


@dataclass(frozen=True)
class Budget:
    trials: int
    epochs: int
    max_concurrent: int = 0  # 0 = as many as the resources allow
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2  # per trial: Tune re-runs it, the Train run resumes from its checkpoint
    # Custom Ray resources, e.g. {"gpu_node": 1} per Train worker, {"head": 0.01} per trial driver.
    worker_resources: tuple[tuple[str, float], ...] = ()
    driver_resources: tuple[tuple[str, float], ...] = ()
    # How a trial trains: "tune" in its own Tune actor (no Train job; single-worker trials only),
    # "train" as a Ray Train job; "auto" = tune for one worker, train for several.
    launcher: str = "auto"

    @property
    def path(self) -> str:
        """``tune`` or ``train``: the launcher that ``auto`` resolves to."""
        if self.launcher != "auto":
            return self.launcher
        return "tune" if self.workers == 1 else "train"


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class Sampler:
    type: str = "tpe"
    seed: int = 0
    # TPE samples at random for its first n trials (Optuna's default 10), then models the results;
    # in a small study 10 is most of the budget. The labelled points count among them.
    n_startup_trials: int = 10


@dataclass(frozen=True)
class Confirm:
    top: int = 3
    seeds: int = 3


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    base_preset: str
    base_overrides: dict[str, Any]
    base: Config  # preset + overrides + budget.epochs, validated
    search: tuple[Param, ...]
    points: tuple[dict[str, Any], ...]  # complete assignments of every searched key
    point_labels: tuple[str, ...]
    online_metric: str
    online_mode: str
    rank_metric: str
    budget: Budget
    scheduler: Scheduler
    sampler: Sampler
    confirm: Confirm
    source: dict[str, Any] = field(default_factory=dict)  # the spec as written (after CLI overrides)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.search]

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.search)

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """The full config of a trial: base + the sampled values (validated)."""
        return with_overrides(self.base, sampled)

    def fingerprint(self) -> str:
        """Identity of what the search explores: changing any of it makes a different study."""
        text = json.dumps(self.source, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_id(sampled: dict[str, Any]) -> str:
    """Short stable hash of a sampled assignment (seeds of one configuration share it)."""
    text = json.dumps({k: sampled[k] for k in sorted(sampled)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# --- parsing ------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> None:
    raise SpecError(f"{where}: {message}")


def _mapping(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        _fail(where, f"expected a mapping, got {type(obj).__name__} {obj!r}")
    return obj


def _only(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            _fail(f"{prefix}{key}", f"unknown key (allowed: {', '.join(allowed)})")


def _int(obj: dict[str, Any], key: str, where: str, default: int, minimum: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{where}.{key}", f"expected an integer, got {value!r}")
    if value < minimum:
        _fail(f"{where}.{key}", f"must be >= {minimum}, got {value}")
    return value


def _num(obj: dict[str, Any], key: str, where: str, default: float, minimum: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(f"{where}.{key}", f"expected a number, got {value!r}")
    if value < minimum:
        _fail(f"{where}.{key}", f"must be >= {minimum}, got {value}")
    return float(value)


def _resources(obj: dict[str, Any], key: str) -> tuple[tuple[str, float], ...]:
    raw = _mapping(obj.get(key), f"budget.{key}")
    out = []
    for name, amount in raw.items():
        where = f"budget.{key}.{name}"
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            _fail(where, "use cpus_per_worker / gpus_per_worker; this is for custom resources")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            _fail(where, f"expected a positive number, got {amount!r}")
        out.append((str(name), float(amount)))
    return tuple(out)


def _str(obj: dict[str, Any], key: str, where: str, default: str, allowed: tuple[str, ...]) -> str:
    value = obj.get(key, default)
    if value not in allowed:
        _fail(f"{where}.{key}", f"unknown value {value!r} (allowed: {', '.join(allowed)})")
    return value


def _config_key(key: Any, where: str) -> str:
    from amdim.config import resolve_key

    if not isinstance(key, str):
        _fail(where, f"config keys are strings, got {key!r}")
    try:
        return resolve_key(key)
    except ConfigError:
        _fail(f"{where}.{key}", "unknown config key (see `amdim config` for the list)")
    raise AssertionError


def _field_type(key: str) -> Any:
    section, name = key.split(".", 1)
    return _field_types(_section_classes()[section])[name]


def canonical(key: str, value: Any) -> Any:
    """``value`` for config key ``key`` in its flat form (what Optuna stores and MLflow logs)."""
    flat = {key: _parse_scalar(key, _field_type(key), value)}
    if isinstance(flat[key], tuple):
        return ",".join(str(v) for v in flat[key])
    return flat[key]


def _parse_param(key: str, raw: Any, base: Config, where: str) -> Param:
    raw = _mapping(raw, where)
    _only(raw, ("type", "low", "high", "log", "step", "values"), where)
    kind = raw.get("type")
    if kind not in ("float", "int", "choice"):
        _fail(f"{where}.type", f"must be float, int or choice, got {kind!r}")
    if kind == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            _fail(f"{where}.values", "must be a non-empty list")
        try:
            canon = tuple(canonical(key, v) for v in values)
        except ConfigError as exc:
            _fail(f"{where}.values", str(exc).split(": ", 1)[-1])
        if len(set(map(repr, canon))) != len(canon):
            _fail(f"{where}.values", "lists a value twice")
        param = Param(key, "choice", values=canon)
        for v in canon:
            _check_reaches_config(base, {key: v}, f"{where}.values", f"value {v!r} ")
        return param
    typ = _field_type(key)
    scalar = next((a for a in getattr(typ, "__args__", (typ,)) if a is not type(None)), typ)
    if kind == "float" and scalar is not float:
        _fail(f"{where}.type", f"{key} is not a float field; use type int or choice")
    if kind == "int" and scalar is not int:
        _fail(f"{where}.type", f"{key} is not an integer field; use type float or choice")
    for bound in ("low", "high"):
        value = raw.get(bound)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(f"{where}.{bound}", f"expected a number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            _fail(f"{where}.{bound}", f"expected an integer, got {value!r}")
    low, high = raw["low"], raw["high"]
    if low > high:
        _fail(where, f"inverted range: low {low} > high {high}")
    if low == high:
        _fail(where, f"empty range: low == high == {low} (use a fixed value in base.set instead)")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        _fail(f"{where}.log", f"expected true or false, got {log!r}")
    if log and low <= 0:
        _fail(f"{where}.low", f"log scale needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None:
        if kind != "int" or isinstance(step, bool) or not isinstance(step, int) or step < 1:
            _fail(f"{where}.step", "only for type int, a positive integer")
        if log:
            _fail(f"{where}.step", "cannot be combined with log")
    cast = int if kind == "int" else float
    param = Param(key, kind, low=cast(low), high=cast(high), log=log, step=step)
    for v in (param.low, param.high):
        _check_reaches_config(base, {key: v}, where, f"value {v!r} ")
    return param


def _check_reaches_config(base: Config, overrides: dict[str, Any], where: str, what: str = "") -> None:
    """``base`` with ``overrides`` must build a valid config: every end of the space (else trials
    would fail at random), and every listed point as a whole. ``what`` starts the message."""
    try:
        with_overrides(base, overrides)
    except ConfigError as exc:
        _fail(where, f"{what}gives an invalid config: {exc}")


SPEC_SETTABLE = (
    "name",
    "description",
    "base.preset",
    "objective",
    "budget",
    "scheduler",
    "sampler",
    "confirm",
)


def apply_spec_sets(raw: Any, items: list[str]) -> Any:
    """``--spec-set FIELD=VALUE`` on a spec as read: ``budget.trials=12``, ``scheduler.type=none``,
    ``name=nce-cifar-subset``, ``base.preset=tiny`` (values read as YAML scalars). The search space
    and the points are the spec's own; config keys are ``--set``'s."""
    import yaml

    if not items:
        return raw
    raw = dict(_mapping(raw, "spec"))
    for item in items:
        field_name, sep, text = item.partition("=")
        if not sep or not field_name:
            raise SpecError(f"--spec-set {item!r}: expected FIELD=VALUE, e.g. budget.trials=12")
        section, _, key = field_name.partition(".")
        if field_name not in SPEC_SETTABLE and section not in SPEC_SETTABLE[3:]:
            raise SpecError(
                f"--spec-set {field_name}: not a settable spec field (allowed: {', '.join(SPEC_SETTABLE)}"
                ", the last five with .FIELD); config keys go through --set"
            )
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if not key or field_name in SPEC_SETTABLE[:3]:
            if key:  # base.preset
                raw["base"] = {**_mapping(raw.get("base"), "base"), key: value}
            else:
                raw[section] = value
        else:
            raw[section] = {**_mapping(raw.get(section), section), key: value}
    return raw


def load_spec(
    path: str | Path, overrides: dict[str, Any] | None = None, spec_sets: list[str] | None = None
) -> StudySpec:
    """Read and validate the spec at ``path``; ``overrides`` are flat keys applied to ``base``,
    ``spec_sets`` spec fields (see :func:`apply_spec_sets`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: study spec not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', exc)})") from None
    return parse_spec(apply_spec_sets(raw, spec_sets or []), overrides=overrides, origin=str(path))


def parse_spec(raw: Any, *, overrides: dict[str, Any] | None = None, origin: str = "spec") -> StudySpec:
    raw = _mapping(raw, origin)
    top = ("name", "description", "base", "search", "points", "objective", "budget", "scheduler")
    _only(raw, (*top, "sampler", "confirm"), "")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        _fail("name", f"must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
    description = raw.get("description", "")

    base_raw = _mapping(raw.get("base"), "base")
    _only(base_raw, ("preset", "data", "set"), "base")
    preset_name = base_raw.get("preset", "tiny")
    try:
        base_cfg = preset(preset_name)
    except ConfigError:
        _fail("base.preset", f"unknown preset {preset_name!r}")
    base_overrides: dict[str, Any] = {}
    for key, value in _mapping(base_raw.get("set"), "base.set").items():
        base_overrides[_config_key(key, "base.set")] = value
    if "data" in base_raw:
        base_overrides["data.spec"] = base_raw["data"]
    for key, value in (overrides or {}).items():
        base_overrides[_config_key(key, "--set")] = value

    budget_raw = _mapping(raw.get("budget"), "budget")
    _only(budget_raw, tuple(Budget.__dataclass_fields__), "budget")
    epochs = _int(budget_raw, "epochs", "budget", base_cfg.train.epochs, 1)
    base_overrides["train.epochs"] = epochs
    try:
        base = with_overrides(base_cfg, base_overrides)
    except ConfigError as exc:
        raise SpecError(f"base.set.{exc}") from None
    _check_data(base.data.spec)
    # Trials run in other working directories, and a resume may start from another one.
    base = with_overrides(base, {"data.spec": absolute_spec(base.data.spec)})

    search_raw = _mapping(raw.get("search"), "search")
    if not search_raw:
        _fail("search", "must name at least one config key to search over")
    params = []
    for key, spec in search_raw.items():
        full = _config_key(key, "search")
        if full == "train.epochs":
            _fail("search.train.epochs", "the epoch budget is budget.epochs, not a searched key")
        params.append(_parse_param(full, spec, base, f"search.{key}"))
    if len({p.key for p in params}) != len(params):
        _fail("search", "names the same config key twice")

    sampler_raw = _mapping(raw.get("sampler"), "sampler")
    _only(sampler_raw, ("type", "seed", "n_startup_trials"), "sampler")
    sampler = Sampler(
        _str(sampler_raw, "type", "sampler", "tpe", SAMPLERS),
        _int(sampler_raw, "seed", "sampler", 0, 0),
        _int(sampler_raw, "n_startup_trials", "sampler", 10, 0),
    )
    if "n_startup_trials" in sampler_raw and sampler.type != "tpe":
        _fail("sampler.n_startup_trials", f"is TPE's; sampler {sampler.type} has no startup trials")
    if sampler.type == "grid":
        for p in params:
            if p.type == "float":
                _fail(f"search.{p.key}", "grid sampler needs type choice or int (a float range has no grid)")

    points, labels = _parse_points(raw.get("points"), params, base, sampler)

    default_trials = math.prod(len(p.grid_values()) for p in params) if sampler.type == "grid" else 8
    trials = _int(budget_raw, "trials", "budget", default_trials, 1)
    if sampler.type == "grid" and trials > default_trials:
        _fail("budget.trials", f"the grid has only {default_trials} points, got {trials}")
    if trials < len(points):
        _fail("budget.trials", f"must cover the {len(points)} listed points, got {trials}")
    budget = Budget(
        trials=trials,
        epochs=epochs,
        max_concurrent=_int(budget_raw, "max_concurrent", "budget", 0, 0),
        workers=_int(budget_raw, "workers", "budget", 1, 1),
        cpus_per_worker=_num(budget_raw, "cpus_per_worker", "budget", 1.0, 0.01),
        gpus_per_worker=_num(budget_raw, "gpus_per_worker", "budget", 0.0, 0.0),
        max_failures=_int(budget_raw, "max_failures", "budget", 2, 0),
        worker_resources=_resources(budget_raw, "worker_resources"),
        driver_resources=_resources(budget_raw, "driver_resources"),
        launcher=_str(budget_raw, "launcher", "budget", "auto", LAUNCHERS),
    )
    if budget.path == "tune" and budget.workers > 1:
        _fail("budget.launcher", f"tune trains in the trial's own actor: one worker, got {budget.workers}")
    if budget.path == "tune" and budget.driver_resources:
        _fail(
            "budget.driver_resources",
            "a single-worker trial trains in its Tune actor, which has no separate driver to place; "
            "use worker_resources, or set budget.launcher: train to keep a Train job per trial",
        )
    if 0 < budget.gpus_per_worker < 1 and budget.workers > 1:
        _fail(
            "budget.gpus_per_worker",
            f"fractional GPUs ({budget.gpus_per_worker:g}) are for single-worker trials; "
            f"with {budget.workers} workers two DDP ranks would share a GPU, which NCCL refuses",
        )
    if budget.gpus_per_worker > 1 and not float(budget.gpus_per_worker).is_integer():
        _fail("budget.gpus_per_worker", f"above 1 must be a whole number, got {budget.gpus_per_worker:g}")
    if base.data.batch_size % budget.workers:
        _fail(
            "budget.workers",
            f"data.batch_size {base.data.batch_size} is the global batch; it must divide by {budget.workers}",
        )

    objective_raw = _mapping(raw.get("objective"), "objective")
    _only(objective_raw, ("online", "rank"), "objective")
    # Default: the held-out validation split when the base config has one, so that early
    # stopping never looks at the test set; else the paper's online test evaluation.
    default_online = "val_acc_lin" if base.data.online_val_fraction > 0 else "test_acc_lin"
    online = _str(objective_raw, "online", "objective", default_online, tuple(ONLINE_METRICS))
    if online in NEEDS_SPLIT and base.data.online_val_fraction <= 0:
        _fail(
            "objective.online",
            f"{online} needs a validation split: set data.online_val_fraction (e.g. 0.1) in base.set",
        )
    if online == "val_acc_knn" and base.train.knn_bank == 0:
        _fail("objective.online", "val_acc_knn needs a kNN bank: train.knn_bank is 0 in base.set")
    if online in NEEDS_SPLIT and "data.online_val_fraction" in {p.key for p in params}:
        _fail("search.data.online_val_fraction", f"fixes what {online} measures; set it in base.set instead")
    rank = _str(objective_raw, "rank", "objective", "probe_val_accuracy", RANK_METRICS)

    sched_raw = _mapping(raw.get("scheduler"), "scheduler")
    _only(sched_raw, ("type", "grace_period", "reduction_factor"), "scheduler")
    scheduler = Scheduler(
        _str(sched_raw, "type", "scheduler", "asha", SCHEDULERS),
        _int(sched_raw, "grace_period", "scheduler", 1, 1),
        _int(sched_raw, "reduction_factor", "scheduler", 2, 2),
    )
    if scheduler.type == "asha" and scheduler.grace_period >= epochs:
        _fail(
            "scheduler.grace_period",
            f"must be < budget.epochs ({epochs}) or ASHA never stops a trial early (use type: none)",
        )

    confirm_raw = _mapping(raw.get("confirm"), "confirm")
    _only(confirm_raw, ("top", "seeds"), "confirm")
    confirm = Confirm(_int(confirm_raw, "top", "confirm", 3, 1), _int(confirm_raw, "seeds", "confirm", 3, 1))

    source = dict(raw)
    source["base"] = {"preset": preset_name, "set": {k: str(v) for k, v in base_overrides.items()}}
    return StudySpec(
        name=name,
        description=str(description),
        base_preset=preset_name,
        base_overrides=base_overrides,
        base=base,
        search=tuple(params),
        points=tuple(points),
        point_labels=tuple(labels),
        online_metric=online,
        online_mode=ONLINE_METRICS[online],
        rank_metric=rank,
        budget=budget,
        scheduler=scheduler,
        sampler=sampler,
        confirm=confirm,
        source=source,
    )


def _parse_points(
    raw: Any, params: list[Param], base: Config, sampler: Sampler
) -> tuple[list[dict[str, Any]], list[str]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        _fail("points", "expected a list of {label: ..., key: value} mappings")
    if raw and sampler.type == "grid":
        _fail("points", "not used with sampler grid (the grid already evaluates every point)")
    base_flat = to_flat(base)
    points, labels = [], []
    for i, item in enumerate(raw):
        where = f"points[{i}]"
        item = dict(_mapping(item, where))
        label = str(item.pop("label", f"point {i}"))
        assigned = {}
        for key, value in item.items():
            full = _config_key(key, where)
            if full not in {p.key for p in params}:
                _fail(f"{where}.{key}", "is not a searched key (set it in base.set, or add it to search)")
            try:
                assigned[full] = canonical(full, value)
            except ConfigError as exc:
                _fail(f"{where}.{key}", str(exc).split(": ", 1)[-1])
        point = {}
        for p in params:  # unnamed keys keep the base config's value
            value = assigned.get(p.key, base_flat[p.key])
            if not p.contains(value):
                _fail(f"{where}.{p.key}", f"value {value!r} lies outside the search space")
            point[p.key] = value
        _check_reaches_config(base, point, where)  # each value is in its range; together too
        if point in points:
            _fail(where, f"repeats points[{points.index(point)}]")
        points.append(point)
        labels.append(label)
    return points, labels


def _check_data(spec: str) -> None:
    """Reject an unknown dataset kind or a missing path now, not inside every trial."""
    from amdim.config import data_spec_problem

    if (problem := data_spec_problem(spec)) is not None:
        _fail("base.data", problem)


def smoke_variant(spec: StudySpec, *, keep_data: bool = False) -> StudySpec:
    """``--smoke-test``: the same search space on a tiny model, tiny data and a tiny budget.

    ``keep_data`` keeps the spec's dataset (``--data`` given) instead of the generated one.
    """
    small = {
        "model.ndf": 16,
        "model.n_rkhs": 128,
        "model.n_depth": 1,
        "model.mlp_hidden": 64,
        "data.spec": "synthetic:n_train=256,n_test=128",
        "data.batch_size": 32,
        "train.max_steps_per_epoch": 2,
        "optim.warmup_steps": 2,
        "probe.epochs": 2,
        "probe.lrs": "0.01",
        "probe.weight_decays": "0",
        "train.log_every": 1000,
    }
    if keep_data:
        small.pop("data.spec")
    if spec.base.model.image_size != 32:
        small["model.image_size"] = 32
        small["aug.test_resize"] = 0
    raw = dict(spec.source)
    raw["name"] = f"{spec.name}-smoke-test"
    raw["base"] = {"preset": spec.base_preset, "set": {**raw["base"]["set"], **small}}
    n_points = min(2, len(spec.points))
    raw["budget"] = {
        **_mapping(raw.get("budget"), "budget"),
        "trials": max(3, n_points) if spec.sampler.type != "grid" else min(3, spec.grid_size()),
        "epochs": 2,
        "max_concurrent": 0,
        "workers": 1,
        "cpus_per_worker": 0.75,
        "gpus_per_worker": 0.0,
    }
    if spec.sampler.type == "grid" and "points" in raw:
        raw.pop("points")
    elif raw.get("points"):
        raw["points"] = raw["points"][:2]  # the first two listed settings are enough to exercise them
        n_points = len(raw["points"])
    raw["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    return parse_spec(raw, origin=f"{spec.name} (smoke test)")
