"""Where a study lives: its folder, the spec and state files in it, and its Optuna storage.

One study is one folder, ``$AMDIM_STORAGE/<name>`` (default ``<runs>/studies/<name>``)::

    spec.json        the validated spec and its fingerprint (a changed spec is refused, not mixed in)
    state.json       the MLflow parent run and experiment, and each stage's state (running,
                     interrupted, finished, failed) with the driver that ran it
    optuna.db        the Optuna study (SQLite; ``amdim dashboard NAME`` serves it)
    tune/search/     the Tune experiment of the search (and tune/confirm/ for the confirm stage);
                     on the Tune path also every trial's per-epoch checkpoints
    train/           on the Train path, one Ray Train run per trial, with its per-epoch checkpoints
    trials/          each trial's outcome (what a restarted trial reports instead of training again)
    tracking-spool/  MLflow writes the tracking server did not take in time, sent later
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from amdim.errors import UserError
from amdim.harness import tracking
from amdim.harness.study_spec import SpecError, StudySpec, parse_spec


def storage_root() -> Path:
    """``$AMDIM_STORAGE`` (shared storage on a cluster) or ``<runs>/studies``, absolute."""
    env = os.environ.get("AMDIM_STORAGE")
    if env and "://" in env:
        raise UserError(
            f"AMDIM_STORAGE={env}: must be a filesystem path shared by all nodes (an NFS mount); "
            "object storage URIs are not supported for study folders"
        )
    return Path(env).expanduser().resolve() if env else tracking.runs_dir() / "studies"


def study_dir(name: str) -> Path:
    return storage_root() / name


def optuna_url(name: str) -> str:
    return f"sqlite:///{study_dir(name) / 'optuna.db'}"


def open_rdb(url: str):
    """An Optuna RDB storage at ``url``. Opening one creates the database's tables when they are
    missing, so two processes opening a new database at once (the driver starting the study and
    ``amdim study status``, optuna-dashboard or a test reading it) can race to create them; the
    loser gets an OperationalError ("table ... already exists", "database is locked") or an
    IntegrityError (the same schema-version row twice) and simply opens it again."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == 9:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def optuna_storage(name: str):
    """The study's Optuna RDB storage (see ``open_rdb``)."""
    return open_rdb(optuna_url(name))


def optuna_study(name: str):
    """The study's Optuna study, or None before its search created it."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=optuna_storage(name))
    except KeyError:
        return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable study record ({exc})") from None


def write_json(path: Path, obj: Any) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def load_study_spec(name: str) -> StudySpec:
    """The spec a study was started with (``amdim study resume/status/confirm NAME``)."""
    path = study_dir(name) / "spec.json"
    if not path.is_file():
        raise UserError(
            f"no study named '{name}' under {storage_root()} (start it with `amdim study run SPEC`)"
        )
    return parse_spec(read_json(path)["source"], origin=str(path))


def check_existing(spec: StudySpec) -> bool:
    """True when the study folder already holds this same spec (a resume); refuse a changed one."""
    path = study_dir(spec.name) / "spec.json"
    if not path.is_file():
        return False
    stored = read_json(path)
    if stored.get("fingerprint") != spec.fingerprint():
        old, new = stored.get("source", {}), spec.source
        changed = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), sort_keys=True, default=str)
                         != json.dumps(new.get(k), sort_keys=True, default=str))  # fmt: skip
        raise SpecError(
            f"study '{spec.name}' already exists in {path.parent} with a different spec "
            f"(changed: {', '.join(changed) or 'values'}); rename the study or delete that folder"
        )
    return True


def write_spec(spec: StudySpec) -> None:
    study_dir(spec.name).mkdir(parents=True, exist_ok=True)
    write_json(study_dir(spec.name) / "spec.json", {"fingerprint": spec.fingerprint(), "source": spec.source})


def state(name: str) -> dict[str, Any]:
    """The study's ``state.json`` ({} before its parent run exists)."""
    path = study_dir(name) / "state.json"
    return read_json(path) if path.is_file() else {}


def set_stage_state(name: str, stage: str, value: str) -> None:
    """A stage's state in ``state.json``: running, interrupted (Ctrl-C: resumable), finished or
    failed (the driver stopped on an error), with the driver that set it."""
    record = state(name)
    record.setdefault("stages", {})[stage] = {
        "state": value, "pid": os.getpid(), "host": platform.node(), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    write_json(study_dir(name) / "state.json", record)


def stage_state(record: dict[str, Any]) -> str:
    """A stage's state as ``state.json`` holds it; a ``running`` stage whose driver (on this host)
    is gone was stopped without a word (killed), and a resume continues it."""
    value = record.get("state", "unknown")
    if value == "running" and record.get("host") == platform.node() and not _alive(record.get("pid")):
        return "stopped (its driver was killed)"
    return value


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def study_names() -> list[str]:
    """Every study under :func:`storage_root`, by name."""
    root = storage_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "spec.json").is_file())
