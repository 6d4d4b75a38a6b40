"""Throughput of the training loop, of the training step and of the data pipeline (``amdim bench``).

:func:`run_bench` measures, in one process:

* **the training loop as ``amdim train`` runs it** (``loop_images_per_s``): ``steps`` consecutive
  steps of :func:`amdim.trainer.train_one_epoch`, fed uint8 batches by
  :func:`amdim.data.train_loader` through :class:`amdim.data.DevicePrefetcher`, each batch's two
  views made on the device by the batched augmentation inside the step, with the config's speed
  options. The device is synchronised only at the two ends of the timed window (after ``warmup``
  untimed steps of the same loop), so the figure includes the augmentation, the prefetcher and
  whatever host syncs the loop makes, exactly as training pays for them;
* **the model step alone** (``step_images_per_s``): forward of both views + multiscale NCE + online
  probes, backward, Adam step, scheduler step, on one fixed batch of views made beforehand, each
  timed step between device syncs; and the same step as a plain fp32 eager baseline (no autocast,
  no channels_last, no compile, non-fused Adam, full-fp32 matmuls) from the same initial weights
  on the same inputs, timed alternately with it so that load from other processes affects both
  alike (``speedup``). ``analysis.bench_official`` compares this step with the official code's;
* **the data path alone** (``data_images_per_s``, unless ``data=False``): loader, prefetcher and
  the batched augmentation (uint8 batch -> both views on the device) with no model, over
  ``steps`` batches synchronised at the ends. In ``amdim train`` the augmentation runs on the
  step's own stream, so it adds to the step rather than overlapping it: ``loop_images_per_s`` is
  about ``1 / (1 / step + 1 / data)``, and ``data_share_of_loop`` is the data path's share of the
  loop's time when both run back to back. The per-image torchvision path
  (``data_torchvision_images_per_s``: per-image seeding, sampling, transforms and collation in
  ``data.num_workers`` workers) is timed too.

Rates: the loop and the data path are ``images / wall time`` of their timed windows; the step
rates are ``batch / median`` of the per-iteration wall times (robust to the odd descheduled step);
the per-step times are in the output too.

``loss_first_step`` and ``baseline_loss_first_step`` are the two step runs' first losses, from the
same weights, inputs and seed: equal to float tolerance without ``train.compile``, and to the bf16
tolerance with ``train.amp=bf16``; with ``train.compile`` inductor draws dropout and the 5t5
locations from its own RNG, so they then agree only statistically (see
tests/test_speed_options.py for the same-RNG check).

FLOPs are counted, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` over one full
eager fp32 training step (forward of both views with NCE and probes, then backward). It counts
matmuls and convolutions only (elementwise ops and the Adam update are not counted), as is usual
for MFU figures. ``fraction_of_bf16_peak`` (the step) and ``loop_fraction_of_bf16_peak`` (the
loop) divide the achieved TFLOP/s by the GPU's datasheet dense bf16 peak
(:data:`BF16_PEAK_TFLOPS`, or ``--peak-tflops``).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from amdim import data as data_mod
from amdim import speed, trainer
from amdim.augment import BatchedTwoViews
from amdim.config import Config, from_flat, to_flat, with_overrides
from amdim.errors import UserError
from amdim.model import AMDIM

Batch = tuple[Tensor, Tensor, Tensor]


def baseline_config(cfg: Config) -> Config:
    """``cfg`` with every speed option off: fp32 (full-fp32 matmuls), no channels_last, eager,
    non-fused Adam."""
    return replace(
        cfg,
        train=replace(cfg.train, amp="off", matmul_precision="fp32", channels_last="false", compile=False),
        optim=replace(cfg.optim, fused="false"),
    )


def bench_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto``; a GPU asked for where none is visible is a one-line UserError."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible to PyTorch on this machine")
    return trainer.resolve_device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _check_counts(steps: int, warmup: int) -> None:
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if warmup < 1:
        raise UserError(f"--warmup must be >= 1 (the first step compiles and allocates), got {warmup}")


def _median_rate(times: list[float], batch: int) -> float:
    return batch / statistics.median(times)


def _take_batch(bundle: data_mod.DataBundle, batch: int) -> tuple[Tensor, Tensor]:
    """The first ``batch`` training images (cycled if the set is smaller) and their labels."""
    idx = torch.arange(batch) % len(bundle.train_labels)
    images = bundle.train_images
    x = images[idx] if isinstance(images, Tensor) else torch.stack([images[int(i)] for i in idx])
    return x, bundle.train_labels[idx]


class _Stepper:
    """A model, optimiser and schedule built as :func:`amdim.trainer.fit` builds them; one call
    runs one training step through :func:`amdim.trainer.train_one_epoch`."""

    def __init__(self, cfg: Config, n_classes: int, device: torch.device, batch: Batch | None, n_steps: int):
        self.cfg, self.device, self.batch = cfg, device, batch
        torch.manual_seed(trainer.epoch_seed(cfg.train.seed, -1, 0))  # the same weights for both runs
        core = AMDIM(cfg.model, cfg.loss, n_classes).to(device)
        self.options = speed.resolve(cfg.train, cfg.optim, device)
        core = speed.prepare(core, self.options, device)
        optimizer = trainer.build_optimizer(core, cfg, device)
        scheduler = trainer.build_scheduler(optimizer, cfg, n_steps)
        model = torch.compile(core, backend=cfg.train.compile_backend) if cfg.train.compile else core
        self.state = trainer.TrainState(model=model, core=core, optimizer=optimizer, scheduler=scheduler)
        self.dist = trainer.DistContext()
        self.losses: list[float] = []

    @property
    def fused(self) -> bool:
        return bool(self.state.optimizer.defaults.get("fused"))

    def __call__(self) -> None:
        speed.set_backends(self.options, self.device)  # the baseline's steps alternate with these
        # A (view1, view2, labels) batch is the trainer's per-image flavour: already augmented,
        # moved to the device (a no-op here) and made channels_last inside the step when asked.
        metrics = trainer.train_one_epoch(
            self.state, iter([self.batch]), None, self.cfg, self.device, self.dist, log=None
        )
        self.losses.append(metrics["loss"])


def count_flops(cfg: Config, n_classes: int, batch: Batch) -> tuple[int, int]:
    """(FLOPs of one training step, FLOPs of one view's encoder forward) for ``batch``.

    The step is the eager fp32 forward of both views with NCE and probes, then the backward, on a
    fresh model (FLOP counts do not depend on dtype, layout or compilation).
    """
    x1, x2, labels = batch
    torch.manual_seed(0)
    model = AMDIM(cfg.model, cfg.loss, n_classes).to(x1.device).train()
    with FlopCounterMode(display=False) as counter:
        model(x1, x2, labels)["loss"].backward()
    step = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encoder(x1)
    return step, counter.get_total_flops()


def _loader_batches(cfg: Config, bundle: data_mod.DataBundle, dev: torch.device):
    """Training batches as ``amdim train`` gets them from its loader, epoch after epoch (so that a
    training set shorter than the timed steps is cycled)."""
    epoch = 0
    while True:
        yield from data_mod.train_loader(
            bundle, cfg.data, cfg.aug, cfg.model.image_size,
            seed=cfg.train.seed, epoch=epoch, pin_memory=dev.type == "cuda",
        )  # fmt: skip
        epoch += 1


def _train_loop(
    cfg: Config, bundle: data_mod.DataBundle, dev: torch.device, steps: int, warmup: int
) -> float:
    """Wall seconds of ``steps`` consecutive training steps of ``amdim train``'s loop, after
    ``warmup`` untimed ones: loader -> prefetcher -> views on the device -> step, the device
    synchronised only where the window opens and closes."""
    n_steps = warmup + steps
    cfg = with_overrides(cfg, {"train.max_steps_per_epoch": n_steps})
    stepper = _Stepper(cfg, bundle.n_classes, dev, None, n_steps)
    marks: dict[int, float] = {}

    def on_step(state: trainer.TrainState, i: int) -> None:
        if i in (warmup - 1, n_steps - 1):
            _sync(dev)
            marks[i] = time.perf_counter()

    batches = data_mod.DevicePrefetcher(_loader_batches(cfg, bundle, dev), dev)
    trainer.train_one_epoch(
        stepper.state,
        iter(batches),
        trainer.device_views(cfg, bundle),
        cfg,
        dev,
        stepper.dist,
        log=None,
        on_step=on_step,
    )
    return marks[n_steps - 1] - marks[warmup - 1]


def _data_path(cfg: Config, bundle: data_mod.DataBundle, dev: torch.device, steps: int, warmup: int) -> float:
    """Wall seconds of ``steps`` batches through the loop's data path with no model: loader ->
    prefetcher -> both views on the device, synchronised at the ends of the window."""
    two_views = trainer.device_views(cfg, bundle)
    gen = data_mod.augment_generator(cfg.train.seed, 0, 0, dev)
    it = iter(data_mod.DevicePrefetcher(_loader_batches(cfg, bundle, dev), dev))
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        trainer.views_on_device(next(it), two_views, dev, gen)
    _sync(dev)
    return time.perf_counter() - t0


def _data_torchvision(
    cfg: Config, bundle: data_mod.DataBundle, device: torch.device, steps: int, warmup: int
) -> list[float]:
    """Per-batch wall times of the per-image torchvision path: train_loader batches (per-image
    seeding, sampling, transforms and collation, in ``data.num_workers`` workers) to the device."""
    it = _loader_batches(replace(cfg, aug=replace(cfg.aug, impl="torchvision")), bundle, device)

    def one() -> None:
        x1, x2, _ = next(it)
        x1.to(device, non_blocking=True)
        x2.to(device, non_blocking=True)

    for _ in range(warmup):
        one()
    return [_timed(one, device) for _ in range(steps)]


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched against
# torch.cuda.get_device_name in this order. Anything else: pass --peak-tflops.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak for a GPU name, or None when it is not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return peak, "cuda max_memory_allocated over the optimised warm-up steps"
    # Linux reports ru_maxrss in KiB: the whole process's high-water mark, not the step's alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS (getrusage)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_average() -> float | None:
    """The 1-minute load average. It includes this benchmark's own threads (about
    ``torch.get_num_threads()``); clearly more than that means other processes competed."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_bench(
    cfg: Config,
    batch_size: int,
    device: str | torch.device = "cpu",
    steps: int = 10,
    warmup: int = 3,
    *,
    preset: str | None = None,
    data: bool = True,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Benchmark the training step (optimised and baseline) and the data pipeline.

    Args:
        cfg: the configuration; its ``train.amp``, ``train.channels_last``, ``train.compile`` and
            ``optim.fused`` are the speed options of the optimised step.
        batch_size: images per step (per view).
        device: ``cpu``, ``cuda`` or ``auto``.
        steps: timed iterations of each measurement (>= 1).
        warmup: untimed iterations before them (>= 1: the first step compiles and allocates).
        preset: the preset name, recorded in the output.
        data: also time the two augmentation paths.
        peak_tflops: the device's dense bf16 peak for ``fraction_of_bf16_peak`` (default: looked
            up by GPU name in :data:`BF16_PEAK_TFLOPS`; none on CPU).

    Returns:
        A JSON-ready dict; rates are images per second from the median iteration time.

    Raises:
        UserError: a bad count, or CUDA asked for where there is none.
    """
    started, load_before = _now(), _load_average()
    dev = bench_device(str(device))
    _check_counts(steps, warmup)
    if peak_tflops is not None and not peak_tflops > 0:
        raise UserError(f"--peak-tflops must be > 0, got {peak_tflops}")
    cfg = with_overrides(cfg, {"data.batch_size": batch_size, "train.device": dev.type})
    bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    # One fixed batch of views, made on the device by the batched path, shared by both steps.
    batch = _fixed_views(cfg, bundle, batch_size, dev)

    step_flops, view_flops = count_flops(cfg, bundle.n_classes, batch)

    n_steps = warmup + steps
    fast = _Stepper(cfg, bundle.n_classes, dev, batch, n_steps)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):  # alone on the device, so that its peak memory is its own
        fast()
    _sync(dev)
    peak_mb, peak_kind = _peak_memory(dev)
    base = _Stepper(baseline_config(cfg), bundle.n_classes, dev, batch, n_steps)
    for _ in range(warmup):
        base()
    fast_times, base_times = [], []
    for _ in range(steps):
        fast_times.append(_timed(fast, dev))
        base_times.append(_timed(base, dev))

    step_rate = _median_rate(fast_times, batch_size)
    base_rate = _median_rate(base_times, batch_size)
    loop_rate = steps * batch_size / _train_loop(cfg, bundle, dev, steps, warmup)
    flops_per_image = step_flops / batch_size
    result: dict[str, Any] = {
        "loop_images_per_s": loop_rate,
        "step_images_per_s": step_rate,
        "baseline_images_per_s": base_rate,
        "speedup": step_rate / base_rate,
        "loop_to_step_ratio": loop_rate / step_rate,
        "step_times_ms": [1e3 * t for t in fast_times],
        "baseline_times_ms": [1e3 * t for t in base_times],
        "flops_per_image": flops_per_image,
        "forward_flops_per_image_per_view": view_flops / batch_size,
        "loop_tflops": flops_per_image * loop_rate / 1e12,
        "tflops": flops_per_image * step_rate / 1e12,
        "baseline_tflops": flops_per_image * base_rate / 1e12,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "loss_first_step": fast.losses[0],
        "baseline_loss_first_step": base.losses[0],
        # The options the step ran with and why (amdim.speed: "auto" decided by this machine).
        "options": {**fast.options.as_dict(), "fused_adam": fast.fused},
        "cpu": speed.cpu_description() if dev.type == "cpu" else None,
    }
    if data:
        data_rate = steps * batch_size / _data_path(cfg, bundle, dev, steps, warmup)
        tv_times = _data_torchvision(cfg, bundle, dev, steps, warmup)
        result["data_images_per_s"] = data_rate
        result["data_torchvision_images_per_s"] = _median_rate(tv_times, batch_size)
        result["data_num_workers"] = cfg.data.num_workers
        result["data_share_of_loop"] = (1 / data_rate) / (1 / data_rate + 1 / step_rate)
    name = _device_name(dev)
    peak = peak_tflops or (bf16_peak_tflops(name) if dev.type == "cuda" else None)
    result["peak_tflops_bf16"] = peak
    result["peak_source"] = (
        "--peak-tflops"
        if peak_tflops
        else "datasheet dense bf16 (amdim.bench.BF16_PEAK_TFLOPS)"
        if peak
        else None
    )
    result["fraction_of_bf16_peak"] = result["tflops"] / peak if peak else None
    result["loop_fraction_of_bf16_peak"] = result["loop_tflops"] / peak if peak else None
    m = cfg.model
    result.update(
        {
            "device": dev.type,
            "device_name": name,
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "preset": preset,
            "data_spec": cfg.data.spec,
            "image_size": m.image_size,
            "ndf": m.ndf,
            "n_rkhs": m.n_rkhs,
            "n_depth": m.n_depth,
            "batch": batch_size,
            "steps": steps,
            "warmup": warmup,
            "timing": (
                "loop and data: images / wall time of the timed window (synced at its ends); "
                "step and baseline: batch / median per-iteration wall time over the timed steps"
            ),
            "config": to_flat(cfg),
            "git_sha": _git_sha(),
            "started_at": started,
            "finished_at": _now(),
            "load_average_1min": {"start": load_before, "end": _load_average()},
        }
    )
    return result


# --- several training processes sharing one device (``amdim bench --concurrent 1,2,4``) ----------


def _fixed_views(cfg: Config, bundle: data_mod.DataBundle, batch_size: int, dev: torch.device) -> Batch:
    images, labels = _take_batch(bundle, batch_size)
    views = BatchedTwoViews(cfg.aug, cfg.model.image_size, bundle.mean, bundle.std)
    x1, x2 = views(images.to(dev), generator=data_mod.augment_generator(cfg.train.seed, 0, 0, dev))
    return x1, x2, labels.to(dev)


def _shared_worker(
    flat: dict, batch_size: int, device: str, steps: int, warmup: int, threads: int, barrier, queue
):
    """One of N processes of :func:`run_shared_bench`: warm up alone, then time ``steps`` steps
    together with the others (a barrier lines their timed windows up)."""
    try:
        torch.set_num_threads(threads)
        cfg = from_flat(flat)
        dev = bench_device(device)
        bundle = data_mod.load_data(cfg.data.spec, cfg.model.image_size)
        stepper = _Stepper(
            cfg, bundle.n_classes, dev, _fixed_views(cfg, bundle, batch_size, dev), warmup + steps
        )
        for _ in range(warmup):
            stepper()
        _sync(dev)
        barrier.wait()
        start = time.time()
        times = [_timed(stepper, dev) for _ in range(steps)]
        queue.put({"start": start, "end": time.time(), "times": times})
    except BaseException as exc:  # reported to the parent as one line
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


def _collect(procs, queue) -> list[dict[str, Any]]:
    """One result per process; a process that died without one (killed, out of memory) is an error."""
    import queue as queue_mod

    results: list[dict[str, Any]] = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=2))
        except queue_mod.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead and queue.empty():
                for p in procs:
                    p.terminate()
                results.append({"error": f"a process exited with code {dead[0].exitcode} without a result"})
                break
    for p in procs:
        p.join()
    return results


def run_shared_bench(
    cfg: Config,
    batch_size: int,
    device: str | torch.device,
    counts: list[int],
    steps: int = 10,
    warmup: int = 3,
    *,
    threads: int | None = None,
    preset: str | None = None,
) -> dict[str, Any]:
    """Study throughput on one device, without Ray: for each N in ``counts``, N processes each
    train the configuration's optimised step on the same device at the same time, as N trials
    with ``gpus_per_worker = 1/N`` would (Ray only sets ``CUDA_VISIBLE_DEVICES``; the trials
    then share the GPU through CUDA's time-slicing, as here).

    Per arrangement: each process's images/s (batch / its median step), their sum, and the
    window rate: all images of the timed steps / (last process's end - first's start). CPU
    processes get ``threads`` torch threads each (default: the cores divided by N, at least 1).
    """
    import multiprocessing as mp

    dev = bench_device(str(device))
    if not counts or any(n < 1 for n in counts):
        raise UserError(f"--concurrent needs counts >= 1, got {counts}")
    _check_counts(steps, warmup)
    cfg = with_overrides(cfg, {"data.batch_size": batch_size, "train.device": dev.type})
    data_mod.load_data(cfg.data.spec, cfg.model.image_size)  # a bad dataset fails here, in one line
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    rows = []
    for n in counts:
        per = threads or max(1, (os.cpu_count() or 1) // n)
        barrier, queue = ctx.Barrier(n, timeout=1800), ctx.Queue()
        args = (to_flat(cfg), batch_size, dev.type, steps, warmup, per, barrier, queue)
        procs = [ctx.Process(target=_shared_worker, args=args) for _ in range(n)]
        for p in procs:
            p.start()
        results = _collect(procs, queue)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise UserError(f"a benchmark process failed: {errors[0]}")
        rates = sorted(_median_rate(r["times"], batch_size) for r in results)
        window = max(r["end"] for r in results) - min(r["start"] for r in results)
        rows.append(
            {
                "processes": n,
                "threads_per_process": per if dev.type == "cpu" else None,
                "per_process_images_per_s": rates,
                "summed_images_per_s": sum(rates),
                "window_images_per_s": n * steps * batch_size / window,
            }
        )
    base = rows[0]["summed_images_per_s"]
    for row in rows:
        row["vs_first"] = row["summed_images_per_s"] / base
    return {
        "mode": "shared-device",
        "device": dev.type,
        "device_name": _device_name(dev),
        "torch_version": torch.__version__,
        "preset": preset,
        "batch": batch_size,
        "steps": steps,
        "warmup": warmup,
        "options": speed.resolve(cfg.train, cfg.optim, dev).as_dict(),
        "arrangements": rows,
        "git_sha": _git_sha(),
        "finished_at": _now(),
    }


__all__ = [
    "BF16_PEAK_TFLOPS",
    "baseline_config",
    "bench_device",
    "bf16_peak_tflops",
    "count_flops",
    "run_bench",
]
