"""A new local MLflow store is seeded from a cached empty one (``tracking.seed_store``): the result
must be the store MLflow itself would have made, and seeding must never touch an existing store."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import mlflow
import pytest

from amdim.harness import tracking

TIMES = {"creation_time", "last_update_time"}


def _clauses(sql: str | None) -> tuple | None:
    """A CREATE statement as its head and the set of its clauses: MLflow's migrations rebuild some
    tables (alembic's batch mode) and write their constraints in an order that changes from one
    new store to the next, so two stores MLflow makes itself differ in that order alone."""
    if sql is None:
        return None
    head, _, body = sql.partition("(")
    return head, tuple(sorted(c.strip() for c in body.rsplit(")", 1)[0].split(", \n")))


def _dump(db: Path) -> tuple[list, dict]:
    with closing(sqlite3.connect(db)) as con:
        schema = sorted(
            (
                (kind, name, table, _clauses(sql))
                for kind, name, table, sql in con.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master"
                )
            ),
            key=str,
        )
        rows = {}
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cur = con.execute(f'SELECT * FROM "{table}"')
            cols = [c[0] for c in cur.description]
            rows[table] = sorted(
                (tuple((c, v) for c, v in zip(cols, row, strict=True) if c not in TIMES) for row in cur),
                key=str,
            )
    return schema, rows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMDIM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_seeded_store_holds_what_mlflow_makes_itself(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # both stores' default experiment gets the same default artifact root
    made, seeded = tmp_path / "made.db", tmp_path / "seeded.db"
    mlflow.MlflowClient(f"sqlite:///{made}").search_experiments()
    assert tracking.seed_store(f"sqlite:///{seeded}") is True
    assert list(cache.glob("mlflow-*-empty-store.db"))
    mlflow.MlflowClient(f"sqlite:///{seeded}").search_experiments()
    assert _dump(seeded) == _dump(made)
    # and it goes on the same way: the next experiment and its run get the same kind of ids
    for db in (made, seeded):
        uri = f"sqlite:///{db}"
        exp = tracking.experiment_id(uri, "e")
        run = mlflow.MlflowClient(uri).create_run(exp, run_name="r")
        mlflow.MlflowClient(uri).log_metric(run.info.run_id, "m", 1.0)
    assert mlflow.MlflowClient(f"sqlite:///{made}").get_experiment_by_name("e").experiment_id == exp


def test_seeding_never_touches_an_existing_store(tmp_path, cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.experiment_id(uri, "keep")
    run = mlflow.MlflowClient(uri).create_run(exp, run_name="r").info.run_id
    before = (tmp_path / "mlflow.db").read_bytes()
    assert tracking.seed_store(uri) is False
    assert (tmp_path / "mlflow.db").read_bytes() == before
    assert mlflow.MlflowClient(uri).get_run(run).info.run_name == "r"
    assert not list(tmp_path.glob(".mlflow.db.*"))


def test_a_broken_template_is_made_again(tmp_path, cache):
    first = tracking.store_template()
    first.write_bytes(b"not a database")
    assert tracking.store_template() == first
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.seed_store(uri) is True
    assert tracking.experiment_id(uri, "e")


def test_without_a_usable_cache_mlflow_makes_the_store(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AMDIM_CACHE_DIR", str(blocker / "cache"))  # cannot be made
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.seed_store(uri) is False
    exp = tracking.experiment_id(uri, "e")
    assert mlflow.MlflowClient(uri).get_experiment(exp).name == "e"


def test_no_seeding_for_a_tracking_server():
    assert tracking.seed_store("http://127.0.0.1:5000") is False


def test_warming_up_makes_the_template_touches_no_store_and_never_raises(tmp_path, cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.warm_store(uri) is None
    assert [p.name for p in cache.glob("mlflow-*-empty-store.db")]  # made once for this machine
    assert not (tmp_path / "mlflow.db").exists()  # the user's store: left to its first use
    assert tracking.seed_store(uri)  # which copies the template now made
    # A cache folder that cannot be made: the warm-up says nothing, and MLflow makes the store.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AMDIM_CACHE_DIR", str(blocker / "cache"))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert tracking.warm_store(other) is None
    assert mlflow.MlflowClient(other).get_experiment(tracking.experiment_id(other, "e")).name == "e"
