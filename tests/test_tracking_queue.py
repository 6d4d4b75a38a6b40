"""The tracking queue: a caller never waits for the tracking server; what the server does not take
is kept in the spool and sent later, once, onto the right run (the end-to-end outage is
tests/test_tracking_outage.py, slow)."""

from __future__ import annotations

import json

import mlflow
import pytest

from amdim.harness.tracking_queue import RunKey, TrackingQueue, replay, spooled

DOWN = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_writes_to_a_server_that_does_not_answer_are_kept_in_the_spool(tmp_path, no_retries):
    lines = []
    records = TrackingQueue(tmp_path / "spool", log=lines.append)
    key = RunKey(DOWN, experiment="exp", parent="p" * 32, tune_trial_id="t1")
    records.ensure(key, "search-t1", {"train.seed": 1}, {"stage": "search"})
    for epoch in (1, 2):
        records.metrics(key, {"loss": 1.0 / epoch, "nan": float("nan")}, step=epoch)
    records.terminate(key, "FINISHED", {"state": "complete"})
    path = records.close(timeout=1.0, who="trial t1")
    assert path is not None and spooled(tmp_path / "spool") == [path]
    ops = [json.loads(line) for line in path.read_text().splitlines()]
    assert [op["kind"] for op in ops] == ["ensure", "metrics", "metrics", "terminate"]
    assert ops[1]["args"]["metrics"][0][:2] == ["loss", 1.0] and len(ops[1]["args"]["metrics"]) == 1  # no NaN
    assert len(lines) == 1 and "kept in" in lines[0] and "does not answer" in lines[0]
    assert replay(tmp_path / "spool") == (0, 1)  # still down: kept for the next time


def test_replay_sends_each_spooled_write_once_onto_the_right_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("exp")).info.run_id
    spool = tmp_path / "spool"
    spool.mkdir()
    trial = RunKey(uri, experiment="exp", parent=parent, tune_trial_id="t1")
    never = RunKey(uri, experiment="exp", parent=parent, tune_trial_id="never-started")

    def op(key, kind, **args):
        return json.dumps({"key": key.as_dict(), "kind": kind, "args": args}) + "\n"

    # The driver's writes were spooled first, before the trial's own (which create its run).
    (spool / "1-driver.jsonl").write_text(
        op(trial, "tags", tags={"checkpoint_path": "/x/checkpoint.pt"})
        + op(never, "terminate", status="FAILED", tags={"state": "failed"})  # its run was never created
    )
    (spool / "2-trial.jsonl").write_text(
        op(trial, "ensure", name="search-t1", params={"train.seed": "1"}, tags={"stage": "search"})
        + op(trial, "metrics", metrics=[["loss", 0.5, 1000, 1]])
        + op(trial, "metrics", metrics=[["loss", 0.5, 1000, 1]])  # sent twice: kept once
        + op(trial, "terminate", status="FINISHED", tags={"state": "complete"})
    )
    assert replay(spool) == (2, 0) and not spooled(spool)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("exp").experiment_id], "tags.tune_trial_id = 't1'"
    )
    assert run.info.status == "FINISHED" and run.data.params == {"train.seed": "1"}
    assert run.data.tags["state"] == "complete" and run.data.tags["tracking"] == "late"
    assert run.data.tags["checkpoint_path"] == "/x/checkpoint.pt"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.5)]
    assert replay(spool) == (0, 0)


def test_the_queue_sends_in_order_and_finds_its_run_again(tmp_path):
    """A trial restarted in another process finds its run by its Tune trial id: no duplicate."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("exp")).info.run_id
    key = RunKey(uri, experiment="exp", parent=parent, tune_trial_id="t9")
    for attempt in (1, 2):
        records = TrackingQueue(None)
        records.ensure(key, "search-t9", {"train.seed": 1}, {"stage": "search"})
        records.metrics(key, {"restarted_at_epoch": attempt}, step=attempt)
        assert records.close(timeout=30) is None
        assert records.resolved(key, timeout=1) is not None
    runs = client.search_runs(
        [client.get_experiment_by_name("exp").experiment_id], "tags.tune_trial_id = 't9'"
    )
    assert len(runs) == 1
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "restarted_at_epoch")] == [1, 2]


def test_a_run_recorded_by_older_code_takes_the_resumed_trials_writes(tmp_path):
    """A trial resumed by newer code rebuilds its config with that code's keys and defaults: its
    run keeps the parameters it recorded (MLflow's are immutable), gains the new keys, names what
    differs in a tag, and every later write still arrives (a slow cross-version resume test once
    lost a whole study's records to the refused parameter)."""
    from amdim.harness.tracking_queue import PARAMS_CHANGED

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("exp")).info.run_id
    key = RunKey(uri, experiment="exp", parent=parent, tune_trial_id="t1")
    old = TrackingQueue(tmp_path / "spool")
    old.ensure(key, "search-t1", {"data.num_workers": 0, "optim.lr": 2e-4}, {"stage": "search"})
    assert old.close(timeout=30) is None
    new = TrackingQueue(tmp_path / "spool")
    new.ensure(key, "search-t1", {"data.num_workers": -1, "optim.lr": 2e-4, "train.matmul_precision": "auto"},
               {"stage": "search"})  # fmt: skip
    new.metrics(key, {"loss": 0.5}, step=2)
    new.terminate(key, "FINISHED", {"state": "complete"})
    assert new.close(timeout=30) is None  # nothing left in the spool
    (run,) = client.search_runs([run.info.experiment_id for run in [client.get_run(parent)]],
                                filter_string="tags.tune_trial_id = 't1'")  # fmt: skip
    assert run.data.params == {
        "data.num_workers": "0",
        "optim.lr": "0.0002",
        "train.matmul_precision": "auto",
    }
    assert run.data.tags[PARAMS_CHANGED] == "data.num_workers: 0 -> -1"
    assert run.data.metrics["loss"] == 0.5 and run.info.status == "FINISHED"


def _refused_lines(spool):
    return [
        json.loads(ln)
        for p in sorted((spool / "refused").glob("*.jsonl"))
        for ln in p.read_text().splitlines()
    ]


def test_a_write_the_server_refuses_does_not_hold_back_the_writes_behind_it(tmp_path):
    """A run deleted while its trial trains (someone tidying the MLflow UI) refuses every later
    write, and a run whose creation is refused (its experiment was deleted) has nowhere to take its
    writes: neither is retried, each is kept with the server's answer under refused/, and the other
    runs' writes still arrive, in the queue and in the spool's replay alike. (An ``mlflow server``
    answers these writes with the same INVALID_PARAMETER_VALUE as the SQLite store used here.)"""
    from amdim.harness.tracking_queue import refused_writes

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("exp")
    parent = client.create_run(exp).info.run_id
    gone, kept = (client.create_run(exp).info.run_id for _ in range(2))
    client.delete_run(gone)
    client.delete_experiment(client.create_experiment("deleted"))
    bad_trial = RunKey(uri, experiment="deleted", parent=parent, tune_trial_id="t-bad")
    spool, lines = tmp_path / "spool", []
    records = TrackingQueue(spool, log=lines.append)
    records.ensure(bad_trial, "search-t-bad", {"a": 1}, {"stage": "search"})
    records.metrics(bad_trial, {"loss": 1.0}, step=1)
    for step in (1, 2):
        records.metrics(RunKey(uri, run_id=gone), {"loss": 1.0}, step=step)
    records.metrics(RunKey(uri, run_id=kept), {"loss": 0.25}, step=1)
    records.terminate(RunKey(uri, run_id=kept), "FINISHED")
    assert records.close(timeout=30) is None  # nothing waits in the spool: the rest was sent
    assert [m.value for m in client.get_metric_history(kept, "loss")] == [0.25]
    assert client.get_run(kept).info.status == "FINISHED"
    refused = _refused_lines(spool)
    assert [(r["kind"], r["key"].get("run_id")) for r in refused] == [
        ("ensure", None),
        ("metrics", None),
        ("metrics", gone),
        ("metrics", gone),
    ]
    assert "MlflowException" in refused[0]["refused"] and "RefusedRun" in refused[1]["refused"]
    assert refused_writes(spool) == 4
    assert len(lines) == 2 and all("refused" in line and "not retried" in line for line in lines)

    # The same writes spooled (a server that was down when the trial ended): replay sends the
    # good ones, keeps the refused ones, and empties the spool.
    kept2 = client.create_run(exp).info.run_id
    (spool / "1-trial.jsonl").write_text("".join(
        json.dumps({"key": key.as_dict(), "kind": "metrics", "args": {"metrics": [["loss", v, 1000, 1]]}}) + "\n"
        for key, v in [(RunKey(uri, run_id=gone), 1.0), (RunKey(uri, run_id=kept2), 0.5)]
    ))  # fmt: skip
    assert replay(spool) == (1, 0) and not spooled(spool)
    assert [m.value for m in client.get_metric_history(kept2, "loss")] == [0.5]
    assert refused_writes(spool) == 5
