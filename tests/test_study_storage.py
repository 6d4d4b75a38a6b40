"""Opening a study's Optuna database: processes that open a new one at the same moment (the
driver starting the study and a reader such as `amdim study status` or optuna-dashboard) race to
create its tables; with :func:`amdim.harness.study.optuna_storage` every reader succeeds, and so
does the driver's searcher creating the study (a CI run once lost a study to this race: the
driver's searcher opened the storage without retrying while a test polled the database)."""

from __future__ import annotations

import multiprocessing as mp


def _open(root: str, barrier, queue, as_driver: bool) -> None:
    import os

    os.environ["AMDIM_STORAGE"] = root
    import optuna

    from amdim.harness.study import optuna_storage
    from amdim.harness.study.layout import optuna_url
    from amdim.harness.study.search import StudySearcher

    searcher = StudySearcher(
        study_name="race", storage_url=optuna_url("race"), space={},
        sampler=optuna.samplers.RandomSampler(seed=0), metric="m", online_metric="o",
    )  # fmt: skip
    barrier.wait()
    try:
        if as_driver:
            searcher.study()
        else:
            optuna_storage("race")
        queue.put("ok")
    except Exception as exc:  # reported to the test, which names it
        queue.put(f"{type(exc).__name__}: {exc}"[:200])


def test_processes_opening_a_new_optuna_database_together_all_succeed(tmp_path):
    ctx = mp.get_context("spawn")
    for attempt in range(2):
        root = tmp_path / f"s{attempt}"
        (root / "race").mkdir(parents=True)
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(str(root), barrier, queue, i % 2 == 0)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [queue.get(timeout=5) for _ in procs] == ["ok"] * 4
