"""``auto`` speed options resolve by what PyTorch reports about the machine (amdim.speed), and the
trainer, the benchmark and the record all use the resolved values."""

from __future__ import annotations

import pytest
import torch

from amdim import speed
from amdim.config import ConfigError, OptimConfig, TrainConfig, preset, with_overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_reports(monkeypatch):
    """Pretend PyTorch reports these CPU capabilities (the probe is hardware; the rule is ours)."""

    def set_caps(**caps):
        monkeypatch.setattr(speed, "cpu_capabilities", lambda: dict(caps))

    return set_caps


@pytest.mark.parametrize(
    "caps, dtype",
    [
        ({}, None),
        ({"avx2": True}, None),
        ({"avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": True}, torch.bfloat16),
    ],
)
def test_auto_amp_is_bf16_on_a_cpu_only_with_native_bf16(cpu_reports, caps, dtype):
    cpu_reports(**caps)
    options = speed.resolve(TrainConfig(), OptimConfig(), CPU)
    assert options.amp == dtype
    assert options.reasons["amp"].startswith("auto on cpu: " + ("bf16" if dtype else "fp32"))


def test_auto_amp_is_bf16_on_cuda_and_explicit_values_win(cpu_reports):
    cpu_reports()
    assert speed.resolve(TrainConfig(), OptimConfig(), CUDA).amp == torch.bfloat16
    assert speed.resolve(TrainConfig(amp="bf16"), OptimConfig(), CPU).amp == torch.bfloat16
    cpu_reports(amx_bf16=True)
    assert speed.resolve(TrainConfig(amp="off"), OptimConfig(), CPU).amp is None


def test_channels_last_and_fused_adam_are_on_by_default_on_the_cpu_only():
    on_cpu = speed.resolve(TrainConfig(), OptimConfig(), CPU)
    on_cuda = speed.resolve(TrainConfig(), OptimConfig(), CUDA)
    assert on_cpu.channels_last and on_cpu.fused and not on_cpu.compile
    assert not on_cuda.channels_last and not on_cuda.fused  # not measured on a GPU yet
    forced = speed.resolve(TrainConfig(channels_last="false"), OptimConfig(fused="true"), CUDA)
    assert not forced.channels_last and forced.fused
    assert "gpu-check" in on_cuda.reasons["channels_last"]


@pytest.mark.parametrize(
    "value, parsed",
    [("auto", "auto"), ("true", "true"), (True, "true"), ("False", "false"), ("off", "false"), ("1", "true")],
)
def test_switches_parse_auto_and_every_boolean_spelling(value, parsed):
    cfg = with_overrides(preset("tiny"), {"train.channels_last": value, "optim.fused": value})
    assert cfg.train.channels_last == cfg.optim.fused == parsed


def test_a_bad_switch_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.channels_last: expected auto, true or false"):
        with_overrides(preset("tiny"), {"train.channels_last": "sometimes"})


def test_the_trainer_builds_what_resolve_says(cpu_reports):
    from amdim.trainer import fit

    cpu_reports()  # no native bf16: fp32, channels_last, fused Adam
    state = fit(
        with_overrides(
            preset("tiny"),
            {"data.spec": "synthetic:n_train=64,n_test=16", "data.batch_size": 16, "train.epochs": 1,
             "train.max_steps_per_epoch": 1, "model.ndf": 16, "model.n_rkhs": 128, "train.device": "cpu"},
        ),
        log=None,
    )  # fmt: skip
    assert state.optimizer.defaults["fused"]
    conv = next(m for m in state.core.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_cpu_description_names_the_bf16_flags(cpu_reports):
    cpu_reports(cpu_name="AMD EPYC", avx2=True)
    text = speed.cpu_description()
    assert (
        text.startswith("AMD EPYC") and "avx2" in text and "no avx512_bf16" in text and "no amx_bf16" in text
    )
