"""``amdim study``: a Ray Tune search over a study spec, with Optuna, ASHA and MLflow.

One job per module; the rest of the project imports from here:

* :mod:`.layout`: where a study lives (its folder, spec and state files, Optuna storage);
* :mod:`.resources`: what a trial holds and how many the cluster holds (pure arithmetic);
* :mod:`.context`: what every trial of a stage needs from the driver;
* :mod:`.records`: the states a trial ends in, the MLflow parent and child runs;
* :mod:`.trial`: the trial function and its two ways of training (Tune path, Train path);
* :mod:`.search`: the Optuna searcher, ASHA, the driver's progress callback;
* :mod:`.runner`: pre-flight checks, the Tuner built or restored, a stage run to its end;
* :mod:`.results`: status, the best configuration and its export, recorded configs.
"""

from amdim.harness.study.context import TrialContext
from amdim.harness.study.layout import (
    load_study_spec,
    optuna_storage,
    optuna_study,
    storage_root,
    study_dir,
)
from amdim.harness.study.records import (
    STATE_COMPLETE,
    STATE_DIVERGED,
    STATE_EARLY,
    STATE_FAILED,
    STATE_INTERRUPTED,
    STATE_RUNNING,
    study_runs,
)
from amdim.harness.study.resources import DRIVER_CPU, actor_resources, concurrency, trial_resources
from amdim.harness.study.results import (
    best_configuration,
    config_from_run,
    export_best,
    format_list,
    format_status,
    list_studies,
    study_status,
)
from amdim.harness.study.runner import RayScope, run_confirm, run_study
from amdim.harness.study.trial import run_trial

__all__ = [
    "DRIVER_CPU",
    "STATE_COMPLETE",
    "STATE_DIVERGED",
    "STATE_EARLY",
    "STATE_FAILED",
    "STATE_INTERRUPTED",
    "STATE_RUNNING",
    "RayScope",
    "TrialContext",
    "actor_resources",
    "best_configuration",
    "concurrency",
    "config_from_run",
    "export_best",
    "format_list",
    "format_status",
    "list_studies",
    "load_study_spec",
    "optuna_storage",
    "optuna_study",
    "run_confirm",
    "run_study",
    "run_trial",
    "storage_root",
    "study_dir",
    "study_runs",
    "study_status",
    "trial_resources",
]
