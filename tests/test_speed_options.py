"""Every speed option gives the plain step's loss, and ``amdim bench`` reports what it promises.

The options are compared through the trainer's own step (:func:`amdim.trainer.train_one_epoch`,
driven by the benchmark's ``_Stepper``), from the same initial weights, on the same views and the
same RNG stream (5t5 locations, probe dropout), over two steps, so the second step also checks
the first Adam update. Tolerances (relative, on the total loss):

* channels_last, fused Adam: 1e-5 (fp32 throughout; only the summation order changes);
* bf16 autocast: 1e-2 (bf16 has an 8-bit mantissa; the NCE scores stay fp32);
* torch.compile: 1e-4 (inductor's fused kernels reorder fp32 sums);
* batched vs per-image augmentation under the same parameters: views to 1e-4, loss to 1e-5.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from amdim import cli, speed
from amdim.augment import BatchedTwoViews, TorchvisionTwoViews, stack_params
from amdim.bench import _Stepper, baseline_config, bf16_peak_tflops, count_flops
from amdim.config import preset, with_overrides
from amdim.data import load_data, mix_seed
from amdim.model import AMDIM
from amdim.trainer import amp_dtype

B = 12
N_CLASSES = 10
CPU = torch.device("cpu")
TINY = with_overrides(preset("tiny"), {"data.batch_size": B, "train.device": "cpu"})


@pytest.fixture(scope="module")
def images():
    bundle = load_data("synthetic:n_train=64,n_test=16")
    return bundle.train_images[:B], bundle.train_labels[:B], bundle.mean, bundle.std


@pytest.fixture(scope="module")
def views(images):
    x, y, mean, std = images
    x1, x2 = BatchedTwoViews(TINY.aug, 32, mean, std)(x, generator=torch.Generator().manual_seed(3))
    return x1, x2, y


def two_step_losses(overrides: dict, views, steps: int = 2) -> list[float]:
    """Losses of the first ``steps`` trainer steps of TINY's plain step (every speed option off)
    with ``overrides``, from fixed seeds."""
    cfg = with_overrides(baseline_config(TINY), overrides)
    stepper = _Stepper(cfg, N_CLASSES, CPU, views, n_steps=10)  # seeds the weights and the RNG
    for _ in range(steps):
        stepper()
    return stepper.losses


@pytest.fixture(scope="module")
def plain(views):
    return two_step_losses({}, views)


def test_channels_last_gives_the_same_loss(views, plain):
    assert two_step_losses({"train.channels_last": True}, views) == pytest.approx(plain, rel=1e-5)


def test_bf16_autocast_gives_the_same_loss_within_bf16_tolerance(views, plain):
    assert amp_dtype("bf16", CPU) is torch.bfloat16
    assert two_step_losses({"train.amp": "bf16"}, views) == pytest.approx(plain, rel=1e-2)
    both = two_step_losses({"train.amp": "bf16", "train.channels_last": True}, views)
    assert both == pytest.approx(plain, rel=1e-2)


def test_bf16_autocast_runs_the_encoder_in_bf16_and_keeps_the_loss_fp32(views):
    x1, x2, y = views
    model = AMDIM(TINY.model, TINY.loss, N_CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r1 = model.encoder(x1)[0]
        out = model(x1, x2, y)
    assert r1.dtype == torch.bfloat16
    assert all(out[k].dtype == torch.float32 for k in ("loss", "loss_nce", "g2l_1t5", "reg"))


def test_fused_adam_gives_the_same_loss(views, plain):
    losses = two_step_losses({"optim.fused": True}, views, steps=3)
    assert losses[:2] == pytest.approx(plain, rel=1e-5)


def test_optim_fused_reaches_the_cpu_optimiser(views):
    assert _Stepper(with_overrides(TINY, {"optim.fused": True}), N_CLASSES, CPU, views, 10).fused
    assert not _Stepper(with_overrides(TINY, {"optim.fused": False}), N_CLASSES, CPU, views, 10).fused


def test_baseline_config_turns_every_speed_option_off():
    fast = with_overrides(
        TINY, {"train.amp": "bf16", "train.channels_last": True, "train.compile": True, "optim.fused": True}
    )
    base = baseline_config(fast)
    assert (base.train.amp, base.train.channels_last, base.train.compile, base.optim.fused) == (
        "off",
        "false",
        False,
        "false",
    )
    assert replace(base, train=fast.train, optim=fast.optim) == fast


@pytest.mark.slow
def test_compile_gives_the_same_loss(views, plain):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # Inductor draws dropout and the 5t5 locations from its own RNG unless told to fall back to
    # eager's, which a same-seed comparison needs.
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = two_step_losses({"train.compile": True}, views)
            fast = two_step_losses(
                {"train.compile": True, "train.channels_last": True, "train.amp": "bf16"}, views
            )
    finally:
        torch._dynamo.reset()
    assert compiled == pytest.approx(plain, rel=1e-4)
    assert fast == pytest.approx(plain, rel=1e-2)


@pytest.mark.cuda
def test_every_speed_option_gives_the_plain_loss_on_cuda(views):
    """The same comparisons on a GPU, torch.compile included (cuDNN, cuBLAS and inductor's Triton
    kernels are all different code from the CPU's)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    cuda = torch.device("cuda")
    on_gpu = tuple(t.to(cuda) for t in views)

    def losses(overrides: dict) -> list[float]:
        cfg = with_overrides(baseline_config(TINY), {**overrides, "train.device": "cuda"})
        stepper = _Stepper(cfg, N_CLASSES, cuda, on_gpu, n_steps=10)
        stepper(), stepper()
        return stepper.losses

    plain = losses({})
    # cuDNN runs fp32 convolutions in TF32 by default (Ampere and later), with a different
    # algorithm per memory layout, so layout and compilation move the fp32 loss more than on a CPU.
    assert losses({"train.channels_last": True}) == pytest.approx(plain, rel=1e-3)
    assert losses({"optim.fused": True}) == pytest.approx(plain, rel=1e-5)
    assert losses({"train.amp": "bf16"}) == pytest.approx(plain, rel=1e-2)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):
            assert losses({"train.compile": True}) == pytest.approx(plain, rel=1e-3)
            every = {
                "train.compile": True,
                "train.channels_last": True,
                "train.amp": "bf16",
                "optim.fused": True,
            }
            assert losses(every) == pytest.approx(plain, rel=1e-2)
    finally:
        torch._dynamo.reset()


def test_batched_augmentation_gives_the_per_image_views_and_loss(images):
    """The same per-image parameters (drawn as the DataLoader path draws them) through both paths."""
    x, y, mean, std = images
    ref = TorchvisionTwoViews(TINY.aug, 32, mean, std)
    params = []
    for i in range(B):
        torch.manual_seed(mix_seed(1, 0, i))  # what amdim.data._Items does per image
        params.append(ref.sample_params(x[i]))
    per_image = [ref.apply(x[i], p) for i, p in enumerate(params)]
    tv1 = torch.stack([v[0] for v in per_image])
    tv2 = torch.stack([v[1] for v in per_image])
    bt1, bt2 = BatchedTwoViews(TINY.aug, 32, mean, std).apply(x, stack_params(params))
    torch.testing.assert_close(bt1, tv1, atol=1e-4, rtol=0)
    torch.testing.assert_close(bt2, tv2, atol=1e-4, rtol=0)
    losses_tv = two_step_losses({}, (tv1, tv2, y))
    losses_bt = two_step_losses({}, (bt1, bt2, y))
    assert losses_bt == pytest.approx(losses_tv, rel=1e-5)


def test_flops_are_counted_and_scale_with_the_batch(views):
    _x1, _x2, _y = views
    step, view = count_flops(TINY, N_CLASSES, views)
    half = tuple(t[: B // 2] for t in views)
    step_half, view_half = count_flops(TINY, N_CLASSES, half)
    assert view > 0 and step > 4 * view  # two views forward, about twice that backward, plus NCE
    assert view == 2 * view_half
    assert step == pytest.approx(2 * step_half, rel=0.05)  # the NCE score matmul is quadratic in B


REQUIRED = {
    "loop_images_per_s",
    "loop_tflops",
    "loop_to_step_ratio",
    "data_share_of_loop",
    "step_images_per_s",
    "baseline_images_per_s",
    "speedup",
    "data_images_per_s",
    "data_torchvision_images_per_s",
    "flops_per_image",
    "forward_flops_per_image_per_view",
    "tflops",
    "peak_memory_mb",
    "peak_memory_kind",
    "device",
    "torch_version",
    "preset",
    "image_size",
    "ndf",
    "n_rkhs",
    "n_depth",
    "batch",
    "threads",
    "started_at",
    "finished_at",
}


def test_bench_command_prints_the_required_json(capsys):
    argv = ["bench", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= REQUIRED
    assert (result["device"], result["preset"], result["batch"], result["ndf"]) == ("cpu", "tiny", 8, 32)
    for key in ("loop_images_per_s", "step_images_per_s", "baseline_images_per_s", "data_images_per_s"):
        assert result[key] > 0
    assert result["flops_per_image"] > 0 and 0 < result["data_share_of_loop"] < 1
    assert result["loop_tflops"] == pytest.approx(
        result["flops_per_image"] * result["loop_images_per_s"] / 1e12
    )
    assert len(result["step_times_ms"]) == 2 and all(t > 0 for t in result["step_times_ms"])
    # The default options are the ones this machine resolves to (amdim.speed), each with a reason;
    # the step's loss is the plain step's, to bf16's tolerance when they include bf16.
    options = result["options"]
    assert set(options["why"]) == {"amp", "matmul", "channels_last", "fused", "compile"}
    assert options["channels_last"] is True and options["fused_adam"] is True  # on for CPUs
    tolerance = 1e-2 if options["amp"] == "bfloat16" else 1e-5
    assert result["loss_first_step"] == pytest.approx(result["baseline_loss_first_step"], rel=tolerance)
    assert result["cpu"]  # the CPU's model and its bf16 flags, whatever the architecture
    # No datasheet peak for a CPU: no invented fraction unless the user gives the peak.
    assert result["peak_tflops_bf16"] is None and result["fraction_of_bf16_peak"] is None


def test_bench_times_the_loop_amdim_train_runs(monkeypatch):
    """The loop figure is train_one_epoch fed by the loader through the prefetcher, with the views
    made on the device inside each step; the data path is the same without the model."""
    import amdim.augment as augment_mod
    import amdim.data as data_mod
    from amdim import trainer
    from amdim.bench import run_bench

    calls = {"views": 0, "loaders": 0, "prefetchers": 0, "epochs": []}
    real_views, real_loader = augment_mod.BatchedTwoViews.__call__, data_mod.train_loader
    real_prefetcher, real_epoch = data_mod.DevicePrefetcher.__iter__, trainer.train_one_epoch

    def views(self, *args, **kwargs):
        calls["views"] += 1
        return real_views(self, *args, **kwargs)

    def loader(*args, **kwargs):
        calls["loaders"] += 1
        return real_loader(*args, **kwargs)

    def prefetcher(self):
        calls["prefetchers"] += 1
        return real_prefetcher(self)

    def epoch(state, batches, two_views, cfg, *args, **kwargs):
        calls["epochs"].append((two_views is not None, cfg.train.max_steps_per_epoch, calls["backends"][-1]))
        return real_epoch(state, batches, two_views, cfg, *args, **kwargs)

    real_backends = speed.set_backends
    calls["backends"] = []

    def backends(options, device):
        calls["backends"].append(options.matmul)
        return real_backends(options, device)

    monkeypatch.setattr(augment_mod.BatchedTwoViews, "__call__", views)
    monkeypatch.setattr(data_mod, "train_loader", loader)
    monkeypatch.setattr(data_mod.DevicePrefetcher, "__iter__", prefetcher)
    monkeypatch.setattr(trainer, "train_one_epoch", epoch)
    monkeypatch.setattr(speed, "set_backends", backends)
    # 8 steps of batch 64 cycle the 256 synthetic training images (4 batches) past an epoch's end;
    # bf16 NCE scores, so that the step's backend settings differ from the fp32 baseline's.
    cfg = with_overrides(
        TINY, {"data.spec": "synthetic:n_train=256,n_test=64", "train.matmul_precision": "bf16"}
    )
    run_bench(cfg, 64, "cpu", steps=6, warmup=2, data=False)
    loop_epochs = [e for e in calls["epochs"] if e[1] == 8]
    assert len(loop_epochs) == 1 and loop_epochs[0][0]  # one loop of 8 steps, views made on the device
    assert loop_epochs[0][2] == "bf16"  # with the step's own backend settings, not the baseline's last
    # one fixed batch for the step timings, then one per step of the loop (the augmentation runs in
    # it), and the loader's epochs cycled through one prefetcher
    assert calls["views"] == 1 + 8
    assert calls["loaders"] >= 2 and calls["prefetchers"] == 1


def test_bench_fraction_of_peak_uses_the_given_peak(capsys):
    argv = ["bench", "--preset", "tiny", "--batch-size", "8", "--smoke-test", "--no-data", "--device", "cpu"]
    assert cli.main([*argv, "--peak-tflops", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_tflops_bf16"] == 0.5 and result["peak_source"] == "--peak-tflops"
    assert result["fraction_of_bf16_peak"] > 0
    assert cli.main([*argv, "--peak-tflops", "0"]) == 2
    assert "--peak-tflops" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_bf16_peak_is_looked_up_by_gpu_name(name, peak):
    assert bf16_peak_tflops(name) == peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_on_cuda_without_a_gpu_is_one_line_exit_2(capsys):
    rc = cli.main(["bench", "--preset", "tiny", "--batch-size", "8", "--device", "cuda"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "cuda" in captured.err.lower()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--warmup", "0")])
def test_bench_rejects_bad_counts_in_one_line(capsys, flag, value):
    rc = cli.main(["bench", "--preset", "tiny", "--batch-size", "8", "--device", "cpu", flag, value])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_concurrent_trains_processes_side_by_side(capsys):
    argv = ["bench", "--preset", "tiny", "--batch-size", "8", "--smoke-test", "--device", "cpu"]
    assert cli.main([*argv, "--concurrent", "1,2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "shared-device" and result["device"] == "cpu"
    one, two = result["arrangements"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["per_process_images_per_s"]) == 1 and len(two["per_process_images_per_s"]) == 2
    assert all(v > 0 for v in one["per_process_images_per_s"] + two["per_process_images_per_s"])
    cores = os.cpu_count() or 1
    assert (one["threads_per_process"], two["threads_per_process"]) == (cores, max(1, cores // 2))
    assert all(a["window_images_per_s"] > 0 for a in result["arrangements"])


@pytest.mark.parametrize("value", ["0", "two", "1,-1"])
def test_bench_concurrent_rejects_bad_counts_in_one_line(capsys, value):
    argv = ["bench", "--preset", "tiny", "--batch-size", "8", "--device", "cpu", "--concurrent", value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--concurrent" in err[0]


def test_a_benchmark_process_that_dies_is_reported_not_awaited():
    import multiprocessing as mp

    from amdim.bench import _collect

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    (result,) = _collect([proc], queue)
    assert result == {"error": "a process exited with code 3 without a result"}
