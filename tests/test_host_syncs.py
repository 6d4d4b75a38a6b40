"""A training step queues its GPU work without waiting for the GPU.

On CUDA, a tensor built from Python values (``torch.tensor([...], device="cuda")``, a Python
scalar written into a tensor by indexing) is a blocking host-to-device copy, and reading a value
(``.item()``, ``nonzero``, boolean indexing) waits for every queued kernel. Either one stalls the
CPU that feeds the GPU. No GPU is needed to find them: every tensor made from host data shows up
as ``aten.lift_fresh``, and every read of a value as ``aten._local_scalar_dense`` or an op whose
output shape depends on the data, under a ``TorchDispatchMode`` on the CPU. The trainer and the
augmentation choose their sync-free paths through ``amdim.speed.host_syncs_are_free``, which the
test turns off, so the CPU runs the code a GPU runs. (``scripts/gpu-check`` runs a step on the GPU
under ``torch.cuda.set_sync_debug_mode("error")`` as well.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amdim import data as data_mod
from amdim import speed, trainer
from amdim.augment import build_two_views
from amdim.config import preset, with_overrides
from amdim.model import AMDIM

aten = torch.ops.aten
HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), .tolist()
    aten.nonzero.default,  # its size is only known on the host
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class Recorder(TorchDispatchMode):
    """Records the ops that would make the host wait for a GPU, while ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            bool_index = func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]
            )
            if func in HOST_DATA or func in HOST_READS or bool_index:
                self.found.append(str(func))
        return func(*args, **kwargs)


def _setup(overrides: dict, device: torch.device, steps: int):
    """A small model's first ``steps`` training steps as the trainer runs them on ``device``:
    (state, batches, two_views, cfg); ``batches`` come through the loader (pinned on CUDA) and
    the prefetcher, as in :func:`amdim.trainer.fit`."""
    cfg = with_overrides(
        preset("tiny"),
        {
            "model.ndf": 16,
            "model.n_rkhs": 64,
            "model.mlp_hidden": 32,
            "data.batch_size": 8,
            "train.amp": "off" if device.type == "cpu" else "auto",
            "data.spec": "synthetic:n_train=64,n_test=16",
            "train.max_steps_per_epoch": steps,
            **overrides,
        },
    )
    bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    torch.manual_seed(0)
    core = AMDIM(cfg.model, cfg.loss, bundle.n_classes).to(device)
    optimizer = trainer.build_optimizer(core, cfg, device)
    scheduler = trainer.build_scheduler(optimizer, cfg, steps)
    state = trainer.TrainState(model=core, core=core, optimizer=optimizer, scheduler=scheduler)
    two_views = build_two_views(cfg.aug, cfg.model.image_size, bundle.mean, bundle.std)
    loader = data_mod.train_loader(
        bundle, cfg.data, cfg.aug, cfg.model.image_size, seed=1, epoch=0, pin_memory=device.type == "cuda"
    )
    return state, data_mod.DevicePrefetcher(loader, device), two_views, cfg


def _recorded_steps(monkeypatch, overrides: dict, steps: int = 4) -> list[str]:
    """The host-sync ops of training steps 2..steps (the first one builds what later ones reuse)."""
    monkeypatch.setattr(speed, "host_syncs_are_free", lambda device: False)
    device = torch.device("cpu")
    state, batches, two_views, cfg = _setup(overrides, device, steps)
    # The loader's work is CPU work on any machine (a GPU gets its batches from the prefetcher's
    # side stream): its batches are made before recording.
    batches = list(batches)
    recorder = Recorder()

    def on_step(_state, i: int) -> None:
        recorder.on = i < steps - 1  # from the end of the first step to the end of the last

    with recorder:
        trainer.train_one_epoch(
            state, iter(batches), two_views, cfg, device, trainer.DistContext(), on_step=on_step
        )
    return recorder.found


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # CIFAR's translate augmentation, the three NCE pairs
        {"aug.crop": True, "aug.flip_p": 0.5},  # random resized crops
        {"loss.n_mix": 3, "loss.pairs": "1t5,1t7"},  # mixtures
        {"train.log_every": 1000, "optim.fused": "true"},
    ],
    ids=["translate", "crop", "mixtures", "fused-adam"],
)
def test_a_training_step_makes_no_tensor_from_host_data_and_reads_none(monkeypatch, overrides):
    found = _recorded_steps(monkeypatch, overrides)
    assert found == [], found


def test_the_recorder_sees_each_kind_of_sync():
    """The check can fail: each kind of sync it looks for is recorded, and so is the jitter's CPU
    branch (samples picked by index, which needs their count on the host)."""
    recorder = Recorder()
    recorder.on = True
    x = torch.randn(8)
    with recorder:
        torch.tensor([1.0, 2.0])
        x.sum().item()
        x[x > 0]
        cfg = with_overrides(preset("tiny"), {"aug.jitter_p": 1.0})
        views = build_two_views(cfg.aug, 32, (0.5,) * 3, (0.25,) * 3)
        views(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    assert {"aten.lift_fresh.default", "aten._local_scalar_dense.default", "aten.index.Tensor"} <= set(
        recorder.found
    )
    assert "aten.nonzero.default" in recorder.found


@pytest.mark.cuda
@pytest.mark.parametrize("overrides", [{}, {"aug.crop": True}], ids=["translate", "crop"])
def test_on_cuda_training_steps_run_under_sync_debug_mode_error(overrides):
    """On a GPU: steps 2..4 of the real loop (pinned loader, prefetcher, augmentation on the
    device, bf16 step, Adam) with CUDA's sync debug mode set to raise at any synchronising call."""
    device, steps = torch.device("cuda"), 4
    state, batches, two_views, cfg = _setup(overrides, device, steps)

    def on_step(_state, i: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if i < steps - 1 else "default")

    try:
        trainer.train_one_epoch(
            state, iter(batches), two_views, cfg, device, trainer.DistContext(), on_step=on_step
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
