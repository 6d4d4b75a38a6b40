"""The one place where amdim reaches past the public APIs of Ray, Optuna and MLflow.

Each function here does what no documented API offers, says which version it was checked
against, and has a test (``tests/test_compat.py``) that fails loudly when the library changes
what it relies on. Moving to a newer minor release of a library: run that test first, then
recheck each function whose ``CHECKED`` entry names the library.
"""

from __future__ import annotations

CHECKED = {"ray": "2.60"}


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
