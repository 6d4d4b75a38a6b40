"""Study specs: the shipped ones parse, and every kind of bad input is one line and exit code 2,
before Ray starts and without writing to MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from amdim import cli
from amdim.harness.study_spec import SpecError, canonical, load_spec, parse_spec, smoke_variant

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SHIPPED = ["smoke", "augmentation", "nce", "multiscale", "mixture", "full", "optimiser"]


def _good() -> dict:
    return yaml.safe_load((STUDIES / "smoke.yaml").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_parse_and_shrink(name):
    spec = load_spec(STUDIES / f"{name}.yaml", {"data.spec": "synthetic"})
    assert spec.name == name and spec.search and spec.budget.trials >= len(spec.points)
    small = smoke_variant(spec)
    assert small.keys == spec.keys and small.budget.epochs == 2 and small.base.model.ndf == 16
    for point in spec.points:  # every listed paper setting builds a valid config
        spec.trial_config(point)


def test_the_optimiser_spec_searches_two_decades_of_learning_rate_around_the_papers():
    spec = load_spec(STUDIES / "optimiser.yaml", {"data.spec": "synthetic"})
    search = {p.key: p for p in spec.search}
    lr = search["optim.lr"]
    assert lr.log and lr.high / lr.low >= 100 and lr.low < 2e-4 < lr.high
    assert {"optim.weight_decay", "optim.warmup_steps"} <= set(search)
    (paper,) = spec.points  # the paper's values, labelled and evaluated first
    assert spec.point_labels == ("paper default",)
    assert (paper["optim.lr"], paper["optim.weight_decay"], paper["optim.beta1"]) == (2e-4, 1e-5, 0.8)
    # On the tiny preset too, whose own Adam settings are the tuned ones.
    tiny = load_spec(STUDIES / "optimiser.yaml", {"data.spec": "synthetic"}, ["base.preset=tiny"])
    assert tiny.base.optim.lr != 2e-4
    config = tiny.trial_config(tiny.points[0])
    assert (config.optim.lr, config.optim.weight_decay, config.optim.beta1) == (2e-4, 1e-5, 0.8)
    assert spec.sampler.n_startup_trials < 10  # TPE's default 10 would be most of the budget


@pytest.mark.parametrize("name", ["proxy-grid", "proxy-tpe", "packing", "minute", "optimiser-settle"])
def test_benchmark_specs_parse(name):
    spec = load_spec(STUDIES / "bench" / f"{name}.yaml")
    assert spec.name == name and spec.budget.workers == 1
    # Recorded with the paper's Adam, whatever the tiny preset's own settings are now.
    paper = spec.trial_config(spec.points[0]) if spec.points else spec.base
    assert (paper.optim.lr, paper.optim.weight_decay, paper.optim.beta1) == (2e-4, 1e-5, 0.8)


def test_smoke_variant_keeps_a_given_dataset(tmp_path):
    spec = load_spec(STUDIES / "nce.yaml", {"data.spec": f"npz:{tmp_path}"})
    assert smoke_variant(spec, keep_data=True).base.data.spec == f"npz:{tmp_path}"
    assert smoke_variant(spec).base.data.spec.startswith("synthetic")


def test_a_relative_dataset_path_is_made_absolute_where_the_study_starts(tmp_path, monkeypatch):
    """Trials run in Ray's working directories, not the driver's: a relative path given on the
    command line (``--data npz:../data/x.npz``) reaches them as the absolute path it named."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    spec = load_spec(STUDIES / "nce.yaml", {"data.spec": "npz:../data/x.npz,classes=3"})
    assert spec.base.data.spec == f"npz:{tmp_path / 'data' / 'x.npz'},classes=3"
    assert spec.trial_config(spec.points[0]).data.spec == spec.base.data.spec
    assert load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic:n_train=64"}).base.data.spec == (
        "synthetic:n_train=64"
    )


def test_paper_ablation_settings_are_points():
    nce = load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic"})
    labelled = dict(zip(nce.point_labels, nce.points, strict=True))
    assert labelled["λ = 0"]["loss.reg_weight"] == 0.0
    assert labelled["tclip off"]["loss.tclip"] is None
    assert labelled["paper default"] == {"loss.reg_weight": 0.05, "loss.tclip": 20.0}
    multi = load_spec(STUDIES / "multiscale.yaml", {"data.spec": "synthetic"})
    assert {p["loss.pairs"] for p in multi.points} == set(multi.search[0].values)  # all 7 subsets
    aug = load_spec(STUDIES / "augmentation.yaml", {"data.spec": "synthetic"})
    assert dict(zip(aug.point_labels, aug.points, strict=True))["no colour jitter"]["aug.jitter_p"] == 0.0


def test_choice_values_are_canonical_flat_values():
    assert canonical("loss.tclip", "off") is None
    assert canonical("loss.pairs", ["1t7", "1t5"]) == "1t7,1t5"
    assert canonical("loss.n_mix", "4") == 4


def test_grid_sampler_counts_its_points():
    raw = _good()
    raw["search"] = {
        "loss.tclip": {"type": "choice", "values": [10.0, "off"]},
        "model.n_depth": {"type": "int", "low": 1, "high": 3},
    }
    raw["sampler"] = {"type": "grid"}
    raw.pop("points")
    raw["budget"].pop("trials")
    spec = parse_spec(raw)
    assert spec.grid_size() == 6 and spec.budget.trials == 6


def _mutate(path: str, value):
    def apply(raw: dict) -> dict:
        node = raw
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
        return raw

    return apply


_DELETE = object()
BAD = {
    "unknown top-level key": (_mutate("epochs", 3), "epochs: unknown key"),
    "unknown config key in search": (
        _mutate("search/loss.temperature", {"type": "float", "low": 0.1, "high": 1}),
        "search.loss.temperature: unknown config key",
    ),
    "unknown config key in base.set": (
        _mutate("base/set/model.width", 3),
        "base.set.model.width: unknown config key",
    ),
    "wrong type for trials": (_mutate("budget/trials", "many"), "budget.trials: expected an integer"),
    "wrong type for a bound": (
        _mutate("search/loss.reg_weight", {"type": "float", "low": "zero", "high": 0.1}),
        "search.loss.reg_weight.low: expected a number",
    ),
    "empty range": (
        _mutate("search/loss.reg_weight", {"type": "float", "low": 0.1, "high": 0.1}),
        "search.loss.reg_weight: empty range",
    ),
    "inverted range": (
        _mutate("search/loss.reg_weight", {"type": "float", "low": 0.2, "high": 0.1}),
        "search.loss.reg_weight: inverted range",
    ),
    "log scale from zero": (
        _mutate("search/loss.reg_weight", {"type": "float", "low": 0.0, "high": 0.1, "log": True}),
        "search.loss.reg_weight.low: log scale needs low > 0",
    ),
    "empty choices": (
        _mutate("search/loss.tclip", {"type": "choice", "values": []}),
        "search.loss.tclip.values",
    ),
    "choice invalid for the field": (
        _mutate("search/loss.pairs", {"type": "choice", "values": ["1t9"]}),
        "search.loss.pairs.values: value '1t9' gives an invalid config",
    ),
    "range end invalid for the field": (
        _mutate("search/aug.jitter_p", {"type": "float", "low": 0.0, "high": 1.5}),
        "search.aug.jitter_p: value 1.5 gives an invalid config",
    ),
    "unknown online metric": (
        _mutate("objective/online", "val_acc"),
        "objective.online: unknown value 'val_acc'",
    ),
    "unknown rank metric": (_mutate("objective/rank", "top5"), "objective.rank: unknown value 'top5'"),
    "unknown dataset": (
        _mutate("base/data", "imagenet21k:/data"),
        "base.data: unknown dataset kind 'imagenet21k'",
    ),
    "missing dataset": (
        _mutate("base/data", "cifar10:/nonexistent/cifar"),
        "base.data: dataset path /nonexistent",
    ),
    "unknown scheduler": (_mutate("scheduler/type", "pbt"), "scheduler.type: unknown value 'pbt'"),
    "grace period beyond the epochs": (
        _mutate("scheduler/grace_period", 3),
        "scheduler.grace_period: must be <",
    ),
    "fractional GPUs on several workers": (
        _mutate("budget/workers", 2),
        "budget.gpus_per_worker: fractional GPUs",
    ),
    "point outside the space": (
        _mutate("points", [{"label": "x", "loss.reg_weight": 0.5}]),
        "points[0].loss.reg_weight: value 0.5 lies outside the search space",
    ),
    "grid over a float range": (_mutate("sampler/type", "grid"), "grid sampler needs type choice or int"),
    "point whose values clash": (  # each value is in its range; together min > max
        lambda raw: {
            **raw,
            "search": {
                "aug.crop_scale_min": {"type": "float", "low": 0.1, "high": 0.6},
                "aug.crop_scale_max": {"type": "float", "low": 0.5, "high": 1.0},
            },
            "points": [{"label": "clash", "aug.crop_scale_min": 0.6, "aug.crop_scale_max": 0.5}],
        },
        "points[0]: gives an invalid config: aug.crop_scale_min: need 0 < crop_scale_min <= crop_scale_max",
    ),
    "bad study name": (_mutate("name", "a/b"), "name: must be 1-64 letters"),
    "GPUs beyond the machine": (
        _mutate("budget/gpus_per_worker", 1),
        "budget.gpus_per_worker: a trial needs 1 GPUs",
    ),
    "CPUs beyond the machine": (
        _mutate("budget/cpus_per_worker", 64),
        "budget.cpus_per_worker: a trial needs",
    ),
    "unknown launcher": (_mutate("budget/launcher", "local"), "budget.launcher: unknown value 'local'"),
    "Tune path with several workers": (
        _mutate("budget/launcher", "tune"),
        "budget.launcher: tune trains in the trial's own actor: one worker, got 2",
    ),
    "driver resources on the Tune path": (
        _mutate("budget/driver_resources", {"head": 0.01}),
        "budget.driver_resources: a single-worker trial trains in its Tune actor",
    ),
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("AMDIM_STORAGE", raising=False)
    return tmp_path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_one_line_exit_2_before_ray_and_mlflow(case, isolated, capsys):
    import ray

    mutate, expected = BAD[case]
    raw = _good()
    if case == "fractional GPUs on several workers":
        raw["budget"]["gpus_per_worker"] = 0.5
    if case == "Tune path with several workers":
        raw["budget"]["workers"] = 2
    if case == "GPUs beyond the machine":
        import torch

        if torch.cuda.is_available():
            raw["budget"]["gpus_per_worker"] = torch.cuda.device_count() + 1
    spec_path = isolated / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(mutate(raw), allow_unicode=True))
    code = cli.main(["study", "run", str(spec_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("amdim: error: "), err
    assert expected in err, err
    assert not ray.is_initialized()
    runs = isolated / "runs"
    assert not (runs / "mlflow.db").exists() and not (runs / "studies").exists()


def test_missing_and_malformed_spec_files(isolated, capsys):
    assert cli.main(["study", "run", str(isolated / "nope.yaml")]) == 2
    assert "nope.yaml: study spec not found" in capsys.readouterr().err
    bad = isolated / "bad.yaml"
    bad.write_text("name: x\nsearch: [unclosed\n")
    assert cli.main(["study", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML at line" in err and err.count("\n") == 0
    assert not (isolated / "runs" / "mlflow.db").exists()


def test_unknown_study_name_for_status_resume_confirm(isolated, capsys):
    for cmd in (["status", "nope"], ["resume", "nope"], ["confirm", "nope"]):
        assert cli.main(["study", *cmd]) == 2
        assert "no study named 'nope'" in capsys.readouterr().err
    assert not os.path.exists(isolated / "runs" / "mlflow.db")


def test_each_path_reserves_what_its_trials_hold():
    """Tune path: the trial's one actor trains and holds everything; Train path: a waiting driver
    (0.25 CPU and driver_resources) plus the workers' shares."""
    from amdim.harness.raycluster import NodeType
    from amdim.harness.study import DRIVER_CPU, actor_resources, concurrency, trial_resources

    raw = _good()  # 1 worker x 0.75 CPU
    raw["budget"]["worker_resources"] = {"gpu_node": 1}
    tune = parse_spec(raw)
    assert tune.budget.path == "tune"
    assert trial_resources(tune) == actor_resources(tune) == {"CPU": 0.75, "gpu_node": 1.0}
    assert concurrency(tune, [NodeType("n", {"CPU": 2, "GPU": 0, "gpu_node": 4}, 1)]) == 2  # max_concurrent 2
    raw["budget"].update({"launcher": "train", "driver_resources": {"head": 0.01}})
    train = parse_spec(raw)
    assert actor_resources(train) == {"CPU": DRIVER_CPU, "head": 0.01}
    assert trial_resources(train) == {"CPU": DRIVER_CPU + 0.75, "gpu_node": 1.0, "head": 0.01}
    raw["budget"].update({"workers": 2, "launcher": "auto", "cpus_per_worker": 0.5})
    assert parse_spec(raw).budget.path == "train"  # auto: several workers need a Train job


@pytest.mark.parametrize(
    ("epochs", "grace", "rf"),
    [(4, 1, 2), (3, 1, 2), (100, 10, 3), (9, 1, 3), (2, 1, 2), (244, 1, 3), (1001, 1, 10)],
)
def test_asha_never_cuts_a_trial_at_its_last_epoch(epochs, grace, rf):
    """Stock ASHA puts a rung on the last epoch when it is grace * rf**k (4 = 1 * 2**2), stopping
    trials after training but before their offline probe. The study's ASHA, made of Ray's public
    parameters alone, has exactly the rungs grace * rf**k below the last epoch (where
    last_epoch - 1 is itself such a rung too: 243 = 3**5, 1000 = 10**3), and lets a trial reach
    its last epoch. The rungs are read through the scheduler's public decisions: after a good
    trial has passed every epoch, a worse trial is told to stop exactly at each rung it reaches."""
    from ray.tune.schedulers import TrialScheduler

    from amdim.harness.study.search import asha

    sched = asha(
        last_epoch=epochs, grace_period=grace, reduction_factor=rf, metric="test_acc_lin", mode="max"
    )

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    good, worse = Trial("good"), Trial("worse")
    for trial in (good, worse):
        sched.on_trial_add(None, trial)
    for epoch in range(1, epochs + 1):  # the best trial is never stopped, its last epoch included
        result = {"epoch": epoch, "test_acc_lin": 1.0}
        assert sched.on_trial_result(None, good, result) == TrialScheduler.CONTINUE
    stopped_at = [
        epoch
        for epoch in range(1, epochs + 1)
        if sched.on_trial_result(None, worse, {"epoch": epoch, "test_acc_lin": 0.0}) == TrialScheduler.STOP
    ]
    assert stopped_at == [grace * rf**k for k in range(40) if grace * rf**k < epochs]


def test_spec_sets_override_spec_fields_and_nothing_else(tmp_path):
    spec = load_spec(
        STUDIES / "nce.yaml",
        {"data.spec": "synthetic"},
        ["name=nce-small", "base.preset=tiny", "budget.trials=12", "budget.gpus_per_worker=0",
         "budget.cpus_per_worker=0.75", "budget.epochs=8", "scheduler.type=none", "sampler.seed=3"],
    )  # fmt: skip
    assert spec.name == "nce-small" and spec.base_preset == "tiny" and spec.base.model.ndf == 32
    assert (spec.budget.trials, spec.budget.epochs, spec.budget.gpus_per_worker) == (12, 8, 0.0)
    assert spec.scheduler.type == "none" and spec.sampler.seed == 3
    assert spec.keys == load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic"}).keys  # same space
    for bad, message in [
        ("search.loss.tclip=5", "not a settable spec field"),
        ("points=[]", "not a settable spec field"),
        ("budget.trials", "expected FIELD=VALUE"),
        ("budget.trials=many", "budget.trials: expected an integer"),
    ]:
        with pytest.raises(SpecError, match=message):
            load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic"}, [bad])


def test_a_spec_that_is_not_utf8_is_one_line_exit_2(isolated, capsys):
    bad = isolated / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert cli.main(["study", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "latin1.yaml: not a UTF-8 text file" in err, err
    assert not (isolated / "runs" / "mlflow.db").exists()


def test_confirm_settings_reruns_every_labelled_setting_with_new_seeds(isolated):
    import optuna

    from amdim.harness.study.layout import optuna_url, study_dir
    from amdim.harness.study.runner import settings_points

    spec = load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic"})
    study_dir("nce").mkdir(parents=True)
    study = optuna.create_study(study_name="nce", storage=optuna_url("nce"), direction="maximize")
    dists = {p.key: optuna.distributions.FloatDistribution(0.0, 0.2) for p in spec.search[:1]}
    dists["loss.tclip"] = optuna.distributions.CategoricalDistribution(list(spec.search[1].values))
    for point in spec.points[:2]:  # the first two settings ran in the search
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, value=0.5))
    points = settings_points(spec, seeds=3)
    assert len(points) == 3 * len(spec.points)
    for i, point in enumerate(spec.points):
        runs = points[3 * i : 3 * i + 3]
        assert all({k: r[k] for k in point} == point for r in runs)
        assert [r["_seed"] for r in runs] == [spec.base.train.seed + s for s in (1, 2, 3)]
        assert all(r.get("_source_trial") == (i if i < 2 else None) for r in runs)


def test_confirm_top_and_settings_reruns_the_best_and_every_labelled_setting_once(isolated):
    """``study confirm NAME --top 2 --settings``: the two best configurations, then every
    labelled setting that is not one of them (the paper's values beside the search's best)."""
    import optuna

    from amdim.harness.study.layout import optuna_url, study_dir
    from amdim.harness.study.runner import confirm_selection

    spec = load_spec(STUDIES / "nce.yaml", {"data.spec": "synthetic"})
    study_dir("nce").mkdir(parents=True)
    study = optuna.create_study(study_name="nce", storage=optuna_url("nce"), direction="maximize")
    dists = {p.key: optuna.distributions.FloatDistribution(0.0, 0.2) for p in spec.search[:1]}
    dists["loss.tclip"] = optuna.distributions.CategoricalDistribution(list(spec.search[1].values))
    best_sampled = {**spec.points[0], spec.search[0].key: 0.123}
    for value, point in ((0.9, best_sampled), (0.8, spec.points[1]), (0.1, spec.points[0])):
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, value=value))
    points = confirm_selection(spec, 2, 3, settings=True)
    configs = [{k: p[k] for k in spec.keys} for p in points[::3]]
    # the best two (a sampled one and the second labelled setting), then the other settings once each
    assert configs == [best_sampled, spec.points[1], spec.points[0], *spec.points[2:]]
    assert len(points) == 3 * (1 + len(spec.points))
    assert confirm_selection(spec, 2, 3, settings=False) == points[:6]


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "smoke"])
def test_research_specs_record_the_measured_signal_and_do_not_early_stop(name):
    """docs/results.md: on real CIFAR-10 images no per-epoch signal ranked trials like the final
    probe (Spearman rho >= 0.7) at a rung before the last epoch; the best one, the online linear
    probe on the held-out split, is recorded as the online objective, and ASHA is off."""
    spec = load_spec(STUDIES / f"{name}.yaml", {"data.spec": "synthetic"})
    assert spec.online_metric == "val_acc_lin" and spec.base.data.online_val_fraction > 0
    assert spec.scheduler.type == "none" and spec.rank_metric == "probe_val_accuracy"


@pytest.mark.parametrize(
    "state, expected",
    [
        # What a study started before the Ray-importing modules moved to amdim/harness/ left: Tune
        # state that names amdim.study_search (the pickle opcode GLOBAL, then STOP).
        (b"camdim.study_search\nAmdimOptunaSearch\n.", "No module named 'amdim.study_search'"),
        (b"\x80\x05\x95\x10\x00\x00", "does not load in this version"),  # cut short by a full disk
    ],
    ids=["earlier version", "damaged"],
)
def test_a_tune_state_this_version_cannot_load_is_one_line_and_touches_nothing(
    state, expected, isolated, capsys
):
    import json

    import ray

    from amdim.harness.study import study_dir

    spec_path = isolated / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_good(), allow_unicode=True))
    spec = load_spec(spec_path)
    sdir = study_dir(spec.name)
    (sdir / "tune" / "search").mkdir(parents=True)
    (sdir / "spec.json").write_text(json.dumps({"fingerprint": spec.fingerprint(), "source": spec.source}))
    (sdir / "tune" / "search" / "tuner.pkl").write_bytes(state)
    before = sorted(p.relative_to(isolated) for p in isolated.rglob("*"))
    code = cli.main(["study", "run", str(spec_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("amdim: error: study 'smoke' cannot be resumed"), err
    assert expected in err and "recorded runs are untouched" in err, err
    assert not ray.is_initialized()
    assert sorted(p.relative_to(isolated) for p in isolated.rglob("*")) == before  # no MLflow store either
