"""The online validation split: early stopping can decide without looking at the test set.

``data.online_val_fraction`` hides a stratified, seeded share of the labelled training images
from the online probes' labels (the encoder still trains on them) and scores the probes on them
every epoch as ``val_acc_lin`` / ``val_acc_mlp``. Study specs default ASHA to ``val_acc_lin`` when
the base config has the split.
"""

from __future__ import annotations

from dataclasses import replace

import mlflow
import pytest
import torch
from test_study_spec import STUDIES, _good

from amdim import data as data_mod
from amdim import trainer
from amdim.config import AUG_CIFAR, DataConfig, preset, to_flat, with_overrides
from amdim.errors import ConfigError
from amdim.harness.study_spec import SpecError, load_spec, parse_spec


@pytest.fixture(scope="module")
def bundle():
    return data_mod.load_data("synthetic:n_train=200,n_test=40")


def test_hold_out_is_stratified_seeded_and_only_masks_its_images(bundle):
    masked, val = data_mod.hold_out_online_val(bundle, 0.1, seed=3)
    again, val_again = data_mod.hold_out_online_val(bundle, 0.1, seed=3)
    _, other = data_mod.hold_out_online_val(bundle, 0.1, seed=4)
    assert torch.equal(val, val_again) and torch.equal(masked.train_labels, again.train_labels)
    assert not torch.equal(val, other)
    labels = bundle.train_labels
    for c in labels.unique().tolist():  # 10 % of every class
        assert (labels[val] == c).sum() == round(0.1 * (labels == c).sum().item())
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    assert (masked.train_labels[val] == -1).all()
    assert torch.equal(masked.train_labels[keep], labels[keep])
    # The caller's bundle and the offline probe's labels are untouched.
    assert (bundle.train_labels >= 0).all() and torch.equal(masked.probe_labels, bundle.probe_labels)


def test_hold_out_never_picks_unlabelled_images(bundle):
    labels = bundle.train_labels.clone()
    labels[::2] = -1  # STL-10-like: half the training set has no label
    partly = replace(bundle, train_labels=labels)
    masked, val = data_mod.hold_out_online_val(partly, 0.2, seed=0)
    assert (labels[val] >= 0).all() and len(val) == round(0.2 * 100)
    assert int((masked.train_labels == -1).sum()) == 100 + len(val)
    with pytest.raises(data_mod.DataError, match="online_val_fraction"):
        data_mod.hold_out_online_val(replace(bundle, train_labels=torch.full_like(labels, -1)), 0.1, 0)


def test_eval_loader_over_indices_covers_them_once_across_ranks(bundle):
    _, val = data_mod.hold_out_online_val(bundle, 0.1, seed=0)
    seen = []
    for rank in range(2):
        loader = data_mod.eval_loader(
            bundle.train_images, bundle.train_labels, AUG_CIFAR, 32, 8, bundle.mean, bundle.std,
            rank=rank, world_size=2, indices=val,
        )  # fmt: skip
        for idx in loader.batches:
            seen.extend(idx.tolist())
    assert sorted(seen) == val.tolist()


def test_training_hides_the_split_from_the_probes_and_scores_it(bundle, monkeypatch):
    cfg = with_overrides(
        preset("tiny"),
        {
            "data.spec": "synthetic:n_train=200,n_test=40",
            "data.batch_size": 50,
            "data.online_val_fraction": 0.2,
            "train.epochs": 1,
            "train.device": "cpu",
            "optim.warmup_steps": 2,
        },
    )
    _, val = data_mod.hold_out_online_val(bundle, 0.2, cfg.train.seed)
    seen: dict[int, int] = {}
    real_loader = data_mod.train_loader

    def spy(b, *args, **kwargs):  # record the labels the training step is given, per image
        loader = real_loader(b, *args, **kwargs)
        for idx in loader.batches:
            seen.update(zip(idx.tolist(), b.train_labels[idx].tolist()))
        return loader

    monkeypatch.setattr(data_mod, "train_loader", spy)
    state = trainer.fit(cfg, bundle=bundle, log=None)
    assert len(seen) == 200  # one epoch visits every image, held-out ones included (NCE uses them)
    assert all(seen[i] == -1 for i in val.tolist())
    assert sum(v == -1 for v in seen.values()) == len(val)
    metrics = state.history[-1]
    for key in ("val_acc_lin", "val_acc_mlp", "test_acc_lin"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_without_the_split_there_is_no_val_metric(bundle):
    cfg = with_overrides(
        preset("tiny"),
        {"data.batch_size": 100, "train.epochs": 1, "train.device": "cpu", "train.max_steps_per_epoch": 1},
    )
    metrics = trainer.fit(cfg, bundle=bundle, log=None).history[-1]
    assert "test_acc_lin" in metrics and "val_acc_lin" not in metrics


@pytest.mark.parametrize("value", [-0.1, 0.6])
def test_fraction_is_validated(value):
    with pytest.raises(ConfigError, match=r"data\.online_val_fraction"):
        with_overrides(preset("tiny"), {"data.online_val_fraction": value})
    assert DataConfig().online_val_fraction == 0.0  # the paper's online evaluation by default


def test_spec_defaults_asha_to_the_validation_split_when_there_is_one():
    raw = _good()
    raw.pop("objective")
    raw["base"]["set"].pop("data.online_val_fraction")
    assert parse_spec(raw).online_metric == "test_acc_lin"
    raw["base"]["set"]["data.online_val_fraction"] = 0.1
    assert parse_spec(raw).online_metric == "val_acc_lin"
    for name in ("smoke", "augmentation", "nce", "multiscale", "mixture", "full"):
        spec = load_spec(STUDIES / f"{name}.yaml", {"data.spec": "synthetic"})
        assert spec.online_metric == "val_acc_lin" and spec.base.data.online_val_fraction == 0.1, name


def test_spec_refuses_a_val_objective_without_the_split():
    raw = _good()
    raw["objective"] = {"online": "val_acc_lin"}
    raw["base"]["set"].pop("data.online_val_fraction")
    with pytest.raises(SpecError, match=r"^objective.online: val_acc_lin needs a validation split"):
        parse_spec(raw)
    raw["base"]["set"]["data.online_val_fraction"] = 0.1
    raw["search"]["data.online_val_fraction"] = {"type": "float", "low": 0.05, "high": 0.2}
    with pytest.raises(SpecError, match=r"^search.data.online_val_fraction"):
        parse_spec(raw)


def test_a_run_recorded_before_the_key_existed_still_reruns(tmp_path, monkeypatch):
    from amdim.harness.study import config_from_run

    monkeypatch.setenv("AMDIM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from amdim.harness.tracking import tracking_uri

    (tmp_path / "runs").mkdir()
    cfg = preset("tiny")
    params = {k: str(v) for k, v in to_flat(cfg).items() if k != "data.online_val_fraction"}
    client = mlflow.MlflowClient(tracking_uri())
    run = client.create_run(client.create_experiment("old"))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    rebuilt, _ = config_from_run(run.info.run_id)
    assert rebuilt == cfg
