"""The one place where amdim reaches past the public APIs of Ray, Optuna and MLflow.

Each function here does what no documented API offers, says which version it was checked
against, and has a test (``tests/test_compat.py``) that fails loudly when the library changes
what it relies on. Moving to a newer minor release of a library: run that test first, then
recheck each function whose ``CHECKED`` entry names the library.
"""

from __future__ import annotations

from typing import Any

CHECKED = {"ray": "2.60", "optuna": "5.0"}


def local_ray_instances() -> tuple[bool, list[str]]:
    """``(cluster, others)`` for this machine: whether a Ray started with ``ray start`` runs here
    (``ray.init()`` without an address joins it), and the GCS addresses of the Ray instances that
    other processes' ``ray.init()`` started here (``ray.init()`` would start a second one beside
    them, and two local instances break Ray Train). Ray has no public call for either.

    Ray 2.60: ``ray._private.services.find_bootstrap_address`` reads the address ``ray start``
    records (``/tmp/ray/ray_current_cluster``), and ``find_gcs_addresses`` lists the GCS servers
    running on this machine (cached: the cache is cleared first)."""
    from ray._private import services

    cluster = services.find_bootstrap_address(None) is not None
    services.find_gcs_addresses.cache_clear()
    return cluster, sorted(services.find_gcs_addresses())


def legacy_optuna_search(state: dict[str, Any]) -> dict[str, Any]:
    """What a study started by an earlier amdim saved of its searcher (a subclass of Ray Tune's
    ``OptunaSearch``, pickled as its ``__dict__``), as :class:`amdim.harness.study.search.
    StudySearcher` takes it: the Optuna study's name and storage URL, the space, the sampler, the
    metrics, and the Tune trial id -> ``optuna.trial.Trial`` map. Raises KeyError for any other
    layout.

    Ray 2.60: ``OptunaSearch`` keeps ``_ot_study`` (an ``optuna.Study``), ``_storage`` (an
    ``RDBStorage``, whose public ``url`` attribute is read), ``_space``, ``_sampler``, ``_metric``
    (the searcher base's) and ``_ot_trials``; the earlier amdim subclass added ``_online_metric``."""
    study = state["_ot_study"]
    return {
        "study_name": study.study_name,
        "storage_url": state["_storage"].url,
        "space": state["_space"],
        "sampler": state.get("_sampler") or study.sampler,
        "metric": state["_metric"],
        "online_metric": state["_online_metric"],
        "trials": dict(state.get("_ot_trials", {})),
    }
