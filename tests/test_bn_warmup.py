"""Spec 6.2's BN warm-up before the online evaluation: off, on the evaluated images, or on training images.

The check is on the encoder's final BatchNorm (the f1 tap, always on): after a warm-up its running
mean is the mean of its inputs over the warm-up images. The test images are colour-inverted, so
the test and training statistics are far apart and the test can tell which images were used.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from amdim import data as data_mod
from amdim import trainer
from amdim.config import preset, with_overrides
from amdim.errors import ConfigError

N_TRAIN, N_TEST = 200, 40


@pytest.fixture(scope="module")
def bundle():
    b = data_mod.load_data(f"synthetic:n_train={N_TRAIN},n_test={N_TEST}")
    return replace(b, test_images=255 - b.test_images)  # a shifted test distribution


def _final_bn(core) -> nn.BatchNorm2d:
    return [m for m in core.encoder.layers.modules() if isinstance(m, nn.BatchNorm2d)][-1]


@torch.no_grad()
def _input_mean(core, batches) -> torch.Tensor:
    """Channel means of the final BN's inputs in train mode, averaged over ``batches``."""
    bn, means = _final_bn(core), []
    hook = bn.register_forward_hook(lambda m, inp, out: means.append(inp[0].mean(dim=(0, 2, 3))))
    was = core.training
    core.train()
    saved = {k: v.clone() for k, v in core.state_dict().items()}  # this probe must not move the stats
    for x, _ in batches:
        core.encoder(x)
    core.load_state_dict(saved)
    core.train(was)
    hook.remove()
    return torch.stack(means).mean(0)


def _fit(bundle, mode: str):
    cfg = with_overrides(
        preset("tiny"),
        {
            "data.batch_size": 50,
            "train.epochs": 1,
            "train.device": "cpu",
            "train.max_steps_per_epoch": 2,
            "train.eval_bn_warmup": mode,
        },
    )
    return cfg, trainer.fit(cfg, bundle=bundle, log=None)


def _loaders(cfg, bundle):
    aug, size, b = cfg.aug, cfg.model.image_size, cfg.data.batch_size
    test = data_mod.eval_loader(bundle.test_images, bundle.test_labels, aug, size, b, bundle.mean, bundle.std)
    train = data_mod.eval_loader(
        bundle.train_images, bundle.train_labels, aug, size, b, bundle.mean, bundle.std
    )
    return test, train


def _gaps(bundle, mode: str) -> tuple[float, float]:
    """After a run with ``mode``: how far the final BN's running mean lies from its input mean over
    the test images and over the training images (largest channel difference)."""
    cfg, state = _fit(bundle, mode)
    test, train = _loaders(cfg, bundle)
    running = _final_bn(state.core).running_mean
    to_test = (running - _input_mean(state.core, test)).abs().max()
    to_train = (running - _input_mean(state.core, train)).abs().max()
    return float(to_test), float(to_train)


def test_warm_up_on_the_evaluated_images_takes_their_statistics(bundle):
    # One test batch (40 images) cycled 50 times: the running mean is that batch's mean, up to the
    # 0.9^50 = 0.5 % of the old value that remains, and far from the training images' mean.
    to_test, to_train = _gaps(bundle, "eval")
    assert to_test < 0.05 * to_train, (to_test, to_train)


def test_warm_up_on_training_images_never_sees_the_test_images(bundle):
    to_test, to_train = _gaps(bundle, "train")
    assert to_train < 0.2 * to_test


def test_off_keeps_the_running_statistics_of_training(bundle):
    cfg, state = _fit(bundle, "off")
    test, _ = _loaders(cfg, bundle)
    before = _final_bn(state.core).running_mean.clone()
    trainer.evaluate_online(state.core, test, torch.device("cpu"), trainer.DistContext())
    torch.testing.assert_close(_final_bn(state.core).running_mean, before, rtol=0, atol=0)
    assert (before - _input_mean(state.core, test)).abs().max() > 0.05


def test_warm_up_cycles_short_loaders_and_skips_single_images(bundle):
    _, state = _fit(bundle, "off")
    x = torch.randn(3, 3, 32, 32)
    assert trainer.warm_up_bn(state.core, [(x, None)], torch.device("cpu"), 5) == 5
    assert trainer.warm_up_bn(state.core, [(x[:1], None)], torch.device("cpu"), 5) == 0  # no usable batch
    assert state.core.training  # the mode is restored


@pytest.mark.parametrize(
    "key, value", [("train.eval_bn_warmup", "test"), ("train.eval_bn_warmup_batches", 0)]
)
def test_bad_settings_are_named(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        with_overrides(preset("tiny"), {key: value})


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_warm_up_works_with_the_online_validation_split(bundle, mode):
    cfg = with_overrides(
        preset("tiny"),
        {
            "data.batch_size": 50,
            "data.online_val_fraction": 0.2,
            "train.epochs": 1,
            "train.device": "cpu",
            "train.max_steps_per_epoch": 2,
            "train.eval_bn_warmup": mode,
            "train.eval_bn_warmup_batches": 3,
        },
    )
    metrics = trainer.fit(cfg, bundle=bundle, log=None).history[-1]
    assert 0 <= metrics["val_acc_lin"] <= 1 and 0 <= metrics["test_acc_lin"] <= 1
