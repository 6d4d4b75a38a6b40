"""amdim/harness/_compat.py: every reach past a public API, checked against the installed
libraries. A failure here means a newer Ray or Optuna changed what a function relies on: recheck
that function (its docstring says what it reads) before moving the pin in pyproject.toml."""

from __future__ import annotations

import inspect

import optuna
import ray

from amdim.harness import _compat


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_the_checked_versions_are_the_installed_ones():
    assert _minor(ray.__version__) == _compat.CHECKED["ray"], (
        f"Ray {ray.__version__} is installed; amdim/harness/_compat.py was checked against {_compat.CHECKED['ray']}"
    )
    assert _minor(optuna.__version__) == _compat.CHECKED["optuna"]


def test_local_ray_instances_reads_what_ray_records():
    from ray._private import services

    assert list(inspect.signature(services.find_bootstrap_address).parameters) == ["temp_dir"]
    assert callable(services.find_gcs_addresses.cache_clear)  # cached: cleared before each look
    cluster, others = _compat.local_ray_instances()
    assert isinstance(cluster, bool) and isinstance(others, list)


def test_legacy_optuna_search_reads_ray_optuna_searchs_layout(tmp_path):
    """An OptunaSearch as an earlier amdim saved it (its __dict__) gives the names the study's
    searcher resumes from."""
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    space = {"loss.reg_weight": optuna.distributions.FloatDistribution(0.0, 0.1)}
    search = OptunaSearch(
        space=space, metric="probe_val_accuracy", mode="max", study_name="old", storage=storage
    )
    search._online_metric = "val_acc_lin"  # what the earlier subclass added
    search.set_search_properties(None, None, {})
    search.suggest("tune-1")
    saved = _compat.legacy_optuna_search(dict(search.__dict__))
    assert saved["study_name"] == "old" and saved["storage_url"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert saved["space"] == space and saved["metric"] == "probe_val_accuracy"
    assert saved["online_metric"] == "val_acc_lin"
    assert list(saved["trials"]) == ["tune-1"] and saved["trials"]["tune-1"].number == 0
