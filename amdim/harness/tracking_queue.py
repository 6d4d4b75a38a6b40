"""MLflow writes that never make training wait for the tracking server.

Every write of a training process (a study trial, a Train worker) and of a study driver's
bookkeeping goes through a :class:`TrackingQueue`: the caller enqueues and returns at once; one
background thread per process sends the writes in order, each retried until it succeeds. A
tracking server that is down for a while therefore costs nothing but delay in the record: the
run's metrics arrive when it is back. What is still unsent when a trial ends and the queue has
waited ``AMDIM_TRACKING_FLUSH_S`` seconds (default 30) for it is written to a spool file in the
study's folder (``tracking-spool/``), and the study driver sends it later (:func:`replay`): at the
end of the stage, and at the start of the next study command.

MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) queues metric batches
too, but drops a batch once its client's retries run out (the future only holds the exception) and
does not cover run creation, artifacts or a run's end; this queue keeps every write until it is
sent or spooled.

Runs are addressed by :class:`RunKey`: a run id where the caller has one, or, for a study trial,
its parent run and Tune trial id, so that a trial can start and train while its MLflow run cannot
be created yet (the first write creates it, or finds it after a restart: never a duplicate).
Every write is idempotent (MLflow keeps one copy of a metric logged twice with the same
timestamp), so a write sent twice (spooled while its first send was still under way) is harmless.

A write the server answers and refuses (an invalid value, a run deleted meanwhile: see
:func:`refused`) would be refused again, so it is not retried: it goes to ``tracking-spool/refused/``
with the server's answer, one line says so, and the writes behind it go on (retrying it would hold
back every later write of the process, and a spool file holding it would never be sent).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPOOL = "tracking-spool"
REFUSED = "refused"  # the spool's subfolder of writes the server refused

# MLflow's error codes for a request the server understood and will refuse every time. A server
# that is down, overloaded or failing (INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE, ...), and an
# endpoint that is not found (a proxy in front of a server that is still starting), are retried.
_REFUSALS = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}
)


class RefusedRun(Exception):
    """A write for a run whose creation the server refused."""


def refused(exc: BaseException) -> bool:
    """True when ``exc`` is the tracking server's refusal of the write itself, which sending it
    again would not change (MLflow's public ``MlflowException.error_code``)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, RefusedRun) or (isinstance(exc, MlflowException) and exc.error_code in _REFUSALS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def flush_seconds() -> float:
    return float(os.environ.get("AMDIM_TRACKING_FLUSH_S", "30"))


@dataclass(frozen=True)
class RunKey:
    """Which MLflow run a write is for: ``run_id``, or the study trial ``tune_trial_id`` under
    ``parent`` in ``experiment`` (found by its tags, created by its ``ensure`` write)."""

    uri: str
    run_id: str | None = None
    experiment: str | None = None
    parent: str | None = None
    tune_trial_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class _Op:
    key: RunKey
    kind: str  # ensure | status | metrics | tags | artifact | terminate
    args: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0
    no_run: bool = False  # the server answered, and the run it is for does not exist (yet)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.as_dict(), "kind": self.kind, "args": self.args}


PARAMS_CHANGED = "params_changed_on_resume"
"""Tag of a run resumed with parameter values other than it recorded ("key: recorded -> new; ...")."""


class _Sender:
    """Performs one write against MLflow; keeps the run ids it has resolved."""

    def __init__(self) -> None:
        self._ids: dict[RunKey, str] = {}
        self.refused_runs: set[RunKey] = set()  # keys whose run the server refused to create

    def run_id(self, key: RunKey, create: dict[str, Any] | None = None) -> str | None:
        if key.run_id:
            return key.run_id
        if key in self._ids:
            return self._ids[key]
        if key in self.refused_runs:
            raise RefusedRun(f"the tracking server refused to create the run of trial {key.tune_trial_id}")
        import mlflow

        client = mlflow.MlflowClient(key.uri)
        exp = client.get_experiment_by_name(key.experiment)
        found = []
        if exp is not None:
            found = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{key.parent}' and tags.tune_trial_id = '{key.tune_trial_id}'",
                max_results=1,
            )
        if found:
            self._ids[key] = found[0].info.run_id
        elif create is not None:
            from amdim.harness.tracking import experiment_id

            tags = {**create["tags"], "mlflow.parentRunId": key.parent, "tune_trial_id": key.tune_trial_id}
            run = client.create_run(
                experiment_id(key.uri, key.experiment), run_name=create["name"], tags=tags
            )
            self._ids[key] = run.info.run_id
        return self._ids.get(key)

    def send(self, op: _Op) -> None:
        import mlflow
        from mlflow.entities import Metric, Param

        try:
            run_id = self.run_id(op.key, op.args if op.kind == "ensure" else None)
        except Exception as exc:
            if op.kind == "ensure" and refused(exc) and not isinstance(exc, RefusedRun):
                self.refused_runs.add(op.key)
            raise
        if run_id is None:
            raise LookupError(f"no MLflow run yet for trial {op.key.tune_trial_id}")
        client = mlflow.MlflowClient(op.key.uri)
        a = op.args
        if op.kind == "ensure":  # found or created above; its parameters and tags, again or first
            # MLflow's parameters are immutable, and a trial resumed by newer code may carry a key
            # that code added or a default it changed: the run keeps what it recorded, gains the
            # new keys, and says what differs in a tag, rather than refusing every later write.
            recorded = client.get_run(run_id).data.params
            wanted = {k: str(v) for k, v in a["params"].items()}
            params = [Param(k, v) for k, v in wanted.items() if k not in recorded]
            for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
                client.log_batch(run_id, params=params[i : i + 100])
            changed = sorted(
                f"{k}: {recorded[k]} -> {v}" for k, v in wanted.items() if recorded.get(k, v) != v
            )
            tags = {**a["tags"], **({PARAMS_CHANGED: "; ".join(changed)[:5000]} if changed else {})}
            _set_tags(client, run_id, tags)
        elif op.kind == "status":
            client.update_run(run_id, status=a["status"])
        elif op.kind == "metrics":
            batch = [Metric(k, float(v), ts, step) for k, v, ts, step in a["metrics"]]
            for i in range(0, len(batch), 1000):
                client.log_batch(run_id, metrics=batch[i : i + 1000])
        elif op.kind == "tags":
            _set_tags(client, run_id, a["tags"])
        elif op.kind == "artifact":
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / a["name"]
                path.write_bytes(base64.b64decode(a["data"]))
                client.log_artifact(run_id, str(path))
        elif op.kind == "terminate":
            _set_tags(client, run_id, a.get("tags", {}))
            client.set_terminated(run_id, status=a["status"])
        else:
            raise ValueError(f"unknown tracking write {op.kind}")


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i : i + 100])


class TrackingQueue:
    """One process's MLflow writes, sent in order by a background thread (see the module doc).

    ``spool_dir``: where writes still unsent at :meth:`close` go (None: they are dropped, with a
    line saying so; a run outside a study has no driver to send them later).
    """

    def __init__(self, spool_dir: Path | None = None, log=print) -> None:
        self.spool_dir = spool_dir
        self.log = log
        self._ops: queue.Queue[_Op] = queue.Queue()
        self._pending: list[_Op] = []
        self._lock = threading.Lock()
        self._sender = _Sender()
        self._refused_keys: set[RunKey] = set()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="amdim-tracking", daemon=True)
        self._thread.start()

    # -- enqueue (never blocks) ------------------------------------------------------------------

    def put(self, key: RunKey, kind: str, **args: Any) -> None:
        op = _Op(key, kind, args)
        with self._lock:
            self._pending.append(op)
        self._ops.put(op)

    def ensure(self, key: RunKey, name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.put(key, "ensure", name=name, params={k: str(v) for k, v in params.items()}, tags=tags)

    def metrics(self, key: RunKey, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [
            [k, float(v), now, int(step)]
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is not stored
        ]
        if rows:
            self.put(key, "metrics", metrics=rows)

    def tags(self, key: RunKey, tags: dict[str, Any]) -> None:
        if tags:
            self.put(key, "tags", tags={k: str(v) for k, v in tags.items()})

    def artifact(self, key: RunKey, name: str, data: bytes) -> None:
        self.put(key, "artifact", name=name, data=base64.b64encode(data).decode())

    def json_artifact(self, key: RunKey, name: str, obj: Any) -> None:
        self.artifact(key, name, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    def terminate(self, key: RunKey, status: str, tags: dict[str, Any] | None = None) -> None:
        self.put(key, "terminate", status=status, tags={k: str(v) for k, v in (tags or {}).items()})

    # -- sending ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            op = self._ops.get()
            delay = 1.0
            while not op.done.is_set():
                try:
                    self._sender.send(op)
                    op.done.set()
                except Exception as exc:  # the server is down, or the run is not there yet
                    if refused(exc):  # ... or it refuses this write: sending it again changes nothing
                        self._refuse(op, exc)
                        op.done.set()
                        break
                    op.attempts += 1
                    op.no_run = isinstance(exc, LookupError)
                    if not op.no_run:
                        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                        self.last_error = f"{type(exc).__name__}: {first}"
                    time.sleep(1.0 if op.no_run else delay)
                    delay = 1.0 if op.no_run else min(delay * 2, 30.0)
            with self._lock:
                self._pending.remove(op)

    def _refuse(self, op: _Op, exc: BaseException) -> None:
        path = keep_refused(self.spool_dir, op, exc)
        if op.key not in self._refused_keys:  # one line per run: a deleted run refuses every write
            self._refused_keys.add(op.key)
            where = f"kept in {path}" if path else "dropped"
            run = op.key.run_id or f"trial {op.key.tune_trial_id}"
            why = _first_line(exc)
            self.log(
                f"amdim: the tracking server refused a {op.kind} write for {run} ({why}); {where}, not retried"
            )

    def resolved(self, key: RunKey, timeout: float) -> str | None:
        """The run id of ``key`` once this queue's writes for it so far are sent (its ``ensure``
        first), waiting at most ``timeout`` s; None when the server has not answered by then."""
        if key.run_id:
            return key.run_id
        deadline = time.monotonic() + timeout
        with self._lock:
            ops = [op for op in self._pending if op.key == key]
        for op in ops:
            if not op.done.wait(max(0.0, deadline - time.monotonic())):
                return None
        return self._sender._ids.get(key)

    def unsent(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every write enqueued so far; True when all were sent. Stops
        early when every write left is for a run the server says does not exist (a trial that
        ended before it created its run): waiting would not create it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            ops = list(self._pending)
        while time.monotonic() < deadline:
            left = [op for op in ops if not op.done.is_set()]
            if not left:
                return True
            if all(op.no_run and op.attempts >= 3 for op in left):
                return False
            left[0].done.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        return all(op.done.is_set() for op in ops)

    def close(self, timeout: float | None = None, *, who: str = "") -> Path | None:
        """Wait up to ``timeout`` (default ``AMDIM_TRACKING_FLUSH_S``) for the writes so far, then
        write the unsent ones to a spool file (returned) for :func:`replay`. The queue stays
        usable: the thread keeps sending, and a write that lands after being spooled lands twice
        (harmlessly)."""
        if self.wait(flush_seconds() if timeout is None else timeout):
            return None
        with self._lock:
            left = [op for op in self._pending if not op.done.is_set()]
        if not left:
            return None
        of = f" of {who}" if who else ""
        why = (
            "they are for runs that do not exist: trials that ended before they created one"
            if all(op.no_run for op in left)
            else f"the tracking server does not answer ({self.last_error})"
        )
        if self.spool_dir is None:
            self.log(f"amdim: {len(left)} MLflow write(s){of} not sent: {why}")
            return None
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{time.time():.6f}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op.to_json()) + "\n" for op in left))
        tmp.replace(path)
        self.log(f"amdim: {len(left)} MLflow write(s){of} kept in {path}, to be sent later: {why}")
        return path


_PROCESS_QUEUE: TrackingQueue | None = None


def process_queue(spool_dir: Path | None, log=print) -> TrackingQueue:
    """This process's queue (one sending thread per process: a reused trial actor keeps sending an
    earlier trial's writes while it trains the next)."""
    global _PROCESS_QUEUE
    if _PROCESS_QUEUE is None:
        _PROCESS_QUEUE = TrackingQueue(spool_dir, log)
    _PROCESS_QUEUE.spool_dir = spool_dir
    _PROCESS_QUEUE.log = log
    return _PROCESS_QUEUE


def spooled(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("*.jsonl")) if spool_dir.is_dir() else []


def refused_writes(spool_dir: Path) -> int:
    """How many writes the tracking server refused (kept in ``spool_dir/refused/``)."""
    folder = spool_dir / REFUSED
    if not folder.is_dir():
        return 0
    return sum(len([ln for ln in p.read_text().splitlines() if ln.strip()]) for p in folder.glob("*.jsonl"))


def keep_refused(spool_dir: Path | None, op: _Op, exc: BaseException) -> Path | None:
    """Append a refused write, with the server's answer, to a file of ``spool_dir/refused/``
    (for a person to read: nothing sends it again)."""
    if spool_dir is None:
        return None
    import socket

    path = spool_dir / REFUSED / f"{socket.gethostname()}-{os.getpid()}.jsonl"  # one writer per file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({**op.to_json(), "refused": _first_line(exc), "at": time.time()}) + "\n")
    except OSError:  # the study folder is not writable: the log line is all that is left of it
        return None
    return path


def replay(spool_dir: Path) -> tuple[int, int]:
    """Send the spooled writes: first every file's ``ensure`` writes (which find or create the
    runs, whichever process spooled them), then each file's other writes in the order they were
    made. A file is removed once all of its writes are sent, and each run that received late
    writes is tagged ``tracking=late``; a write for a run that was never created (its trial ended
    before it made one) is dropped; a write the server refuses goes to ``refused/`` (see
    :func:`refused`) and the rest are sent. Returns ``(files sent, files left)``. Never raises: with
    the server still down, everything stays for the next call."""
    from amdim.errors import UserError
    from amdim.harness.tracking import check_tracking

    files = spooled(spool_dir)
    batches = []
    for path in files:
        try:
            raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            batches.append((path, [_Op(RunKey(**r["key"]), r["kind"], r["args"]) for r in raw]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: left alone
    try:
        for uri in {op.key.uri for _, ops in batches for op in ops}:
            check_tracking(uri)
    except UserError:
        return 0, len(files)
    sender, sent = _Sender(), 0

    def send(op: _Op) -> bool:
        try:
            sender.send(op)
            return True
        except LookupError:
            return False
        except Exception as exc:
            if not refused(exc):
                raise
            keep_refused(spool_dir, op, exc)
            return False

    try:
        for _, ops in batches:
            for op in ops:
                if op.kind == "ensure":
                    send(op)
        for path, ops in batches:
            late = set()
            for op in ops:
                if op.kind != "ensure" and send(op):
                    late.add((op.key.uri, sender.run_id(op.key)))
            import mlflow

            for uri, run_id in late:
                mlflow.MlflowClient(uri).set_tag(run_id, "tracking", "late")
            with contextlib.suppress(OSError):
                path.unlink()
            sent += 1
    except Exception:  # the server stopped answering again: the rest waits for the next call
        pass
    return sent, len(files) - sent
