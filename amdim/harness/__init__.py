"""The layers over the method that import Ray, Optuna or MLflow (each lazily or at module level).

``tracking`` (the MLflow record), ``local`` (``amdim train --local`` with its record),
``ray_train`` (``amdim train`` on a Ray Train job), ``trial`` (the training body of a Ray process:
a study trial in its Tune actor, or a Train worker), ``study_spec`` (the YAML study specs),
``study`` and ``study_search`` (the Tune + Optuna + ASHA study runner and its Ray-side classes),
``bench_ray`` (Ray Train against ``--local``). Everything above them in ``amdim/`` is torch only.
"""
