"""The AMDIM training loop, single process or one rank of a data-parallel group.

The loop reads top to bottom: build data, model, optimiser and schedule; optionally restore a
checkpoint; then for every epoch train, evaluate the online probes on the test set, all-reduce the
metrics and hand them (with a checkpoint payload) to ``on_epoch_end``. The local CLI path saves the
payload to ``DIR/checkpoint.pt``; the Ray Train path reports it through Ray. Nothing here imports
Ray or MLflow.

Reproducibility: every epoch reseeds torch from (seed, epoch, rank), and the data order and the
batched augmentation draw from generators seeded the same way, so resuming from an epoch-boundary
checkpoint replays the next step exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from amdim import checkpoint as ckpt_io
from amdim import data as data_mod
from amdim import speed
from amdim.augment import BatchedTwoViews, build_two_views
from amdim.config import Config, to_flat
from amdim.distributed import all_gather_with_grad
from amdim.errors import DivergedError, UserError
from amdim.model import AMDIM
from amdim.probes import correct_and_count


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible to PyTorch on this machine")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: fp32); see amdim.speed."""
    from amdim.config import OptimConfig, TrainConfig

    return speed.resolve(TrainConfig(amp=amp), OptimConfig(), device).amp


class LRSchedule:
    """Linear warm-up over the first updates, then multi-step decay at epoch milestones (spec 7).

    A plain object (not a closure) so LambdaLR stores its state in the checkpoint.
    """

    def __init__(self, warmup_steps: int, milestone_steps: list[int], gamma: float):
        self.warmup_steps = warmup_steps
        self.milestone_steps = list(milestone_steps)
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        warm = 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)
        return warm * self.gamma ** sum(step >= m for m in self.milestone_steps)


def milestone_epochs(cfg: Config) -> list[int]:
    """Milestone fractions -> epoch indices: (250/300, 280/300) of 300 epochs -> [250, 280]."""
    return [round(f * cfg.train.epochs) for f in cfg.optim.milestones]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Adam:
    """Adam (0.8, 0.999), eps 1e-8, coupled L2 weight decay on every parameter (spec 7)."""
    o = cfg.optim
    fused = speed.resolve(cfg.train, o, device).fused and device.type in ("cuda", "cpu")  # torch fuses both
    return torch.optim.Adam(
        model.parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=fused or None,
    )


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    steps = [e * steps_per_epoch for e in milestone_epochs(cfg)]
    return torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(cfg.optim.warmup_steps, steps, cfg.optim.gamma))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 9_176 + rank * 7_919) % (2**31 - 1)


@dataclass
class DistContext:
    """This process's place in the data-parallel group (rank 0 of 1 when single-process)."""

    rank: int = 0
    world_size: int = 1

    @property
    def gather(self) -> Callable[[Tensor], Tensor] | None:
        return all_gather_with_grad if self.world_size > 1 else None

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        if self.world_size > 1:
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def all_reduce_max(self, values: Tensor) -> Tensor:
        if self.world_size > 1:
            tdist.all_reduce(values, op=tdist.ReduceOp.MAX)
        return values


@dataclass
class TrainState:
    model: nn.Module  # possibly DDP-wrapped
    core: AMDIM  # the unwrapped model (what is saved)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # completed epochs
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def checkpoint_payload(cfg: Config, state: TrainState, n_classes: int) -> dict[str, Any]:
    """The explicit dict saved after every epoch (see amdim.checkpoint)."""
    return {
        "config": to_flat(cfg),
        "n_classes": n_classes,
        "model": state.core.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": ckpt_io.rng_state(),
        "history": state.history,
    }


def restore(state: TrainState, payload: dict[str, Any]) -> None:
    try:
        state.core.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0][:160]
        raise ckpt_io.CheckpointError(f"checkpoint does not match this configuration ({msg})") from None
    state.epoch, state.step = int(payload["epoch"]), int(payload.get("step", 0))
    state.history = list(payload.get("history", []))
    if "rng" in payload:
        ckpt_io.set_rng_state(payload["rng"])


def model_from_checkpoint(
    payload: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[AMDIM, Config]:
    """Rebuild the model and its exact config from a checkpoint dict."""
    from amdim.config import from_flat

    cfg = from_flat(payload["config"])
    model = AMDIM(cfg.model, cfg.loss, int(payload["n_classes"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[0][:160]
        raise ckpt_io.CheckpointError(f"checkpoint weights do not match its config ({msg})") from None
    return model.to(device), cfg


def device_views(cfg: Config, bundle: data_mod.DataBundle) -> BatchedTwoViews | None:
    """The augmentation the training loop runs on the device (``aug.impl=batched``), or None when
    the loader workers make the views (``torchvision``)."""
    if cfg.aug.impl != "batched":
        return None
    return build_two_views(cfg.aug, cfg.model.image_size, bundle.mean, bundle.std)


def views_on_device(
    batch: tuple[Tensor, ...],
    two_views: Callable[..., tuple[Tensor, Tensor]] | None,
    device: torch.device,
    gen,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x1, x2, labels) on the device, from any loader flavour (see amdim.data.train_loader)."""
    if len(batch) == 2:  # batched path: uint8 images, augmented here on the device
        images, labels = batch
        x1, x2 = two_views(images.to(device, non_blocking=True), generator=gen)
    else:  # per-image path: views made in the loader workers
        x1, x2, labels = batch
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        if x1.dtype == torch.uint8:  # photos flipped and cropped in the workers: the colour here
            x1, x2 = two_views.colour(x1, x2, generator=gen)
    return x1, x2, labels.to(device, non_blocking=True)


# A non-finite loss stops training at once. Reading the check is free on the CPU; on a GPU it is a
# host sync, and in a data-parallel group an all-reduce (every rank must stop at the same step),
# so there it is read every FINITE_CHECK_EVERY steps and at the end of the epoch, while the step
# at which the loss first went bad is kept on the device, so that the error still names it.
FINITE_CHECK_EVERY = 20


def _check_finite(bad: Tensor, dist: DistContext, epoch: int, epoch_start_step: int) -> None:
    """Raise DivergedError when any rank saw a non-finite loss (``bad``: its global step, or -1)."""
    worst = int(dist.all_reduce_max(bad.clone()))
    if worst >= 0:
        raise DivergedError(epoch, worst - epoch_start_step)


def train_one_epoch(
    state: TrainState,
    batches: Iterator[tuple[Tensor, ...]],
    two_views: Callable[..., tuple[Tensor, Tensor]] | None,
    cfg: Config,
    device: torch.device,
    dist: DistContext,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[TrainState, int], None] | None = None,
) -> dict[str, float]:
    """One pass over the training batches; returns metrics averaged over all ranks' steps.

    ``on_step(state, i)`` runs after the i-th optimiser step of the epoch (a test hook).
    """
    state.model.train()
    options = speed.resolve(cfg.train, cfg.optim, device)
    dtype = options.amp
    gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.train.seed, state.epoch, dist.rank) + 1)
    sums: dict[str, Tensor] = {}
    n_steps, n_images, t0 = 0, 0, time.perf_counter()
    bad = torch.full((), -1, dtype=torch.long, device=device)  # first global step with a non-finite loss
    check_every_step = speed.host_syncs_are_free(device) and dist.world_size == 1
    epoch_start = state.step
    for i, batch in enumerate(batches):
        if cfg.train.max_steps_per_epoch and i >= cfg.train.max_steps_per_epoch:
            break
        x1, x2, labels = views_on_device(batch, two_views, device, gen)
        if options.channels_last:
            x1, x2 = (
                x1.contiguous(memory_format=torch.channels_last),
                x2.contiguous(memory_format=torch.channels_last),
            )
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = state.model(x1, x2, labels, gather=dist.gather, rank_offset=dist.rank * x1.shape[0])
        loss = out["loss"].detach()
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), torch.full_like(bad, state.step + 1), bad)
        if check_every_step or (i + 1) % FINITE_CHECK_EVERY == 0:
            _check_finite(bad, dist, state.epoch + 1, epoch_start)  # before a non-finite step is applied
        state.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        n_steps += 1
        n_images += x1.shape[0]
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
        if on_step is not None:
            on_step(state, i)
        if log is not None and state.step % cfg.train.log_every == 0:
            log(f"epoch {state.epoch + 1} step {state.step} loss {float(out['loss'].detach()):.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    _check_finite(bad, dist, state.epoch + 1, epoch_start)
    if n_steps == 0:
        raise UserError(
            f"the training set yields no full batch of data.batch_size={cfg.data.batch_size} "
            f"per process; lower data.batch_size or use more data"
        )
    keys = sorted(sums)
    totals = dist.all_reduce_sum(
        torch.stack([sums[k] for k in keys] + [torch.tensor(float(n_steps), device=device)]).to(device)
    )
    steps_all = float(totals[-1])
    metrics = {k: float(v) / steps_all for k, v in zip(keys, totals[:-1].tolist())}
    labelled = metrics.pop("labelled")
    for head in ("lin", "mlp"):
        correct = metrics.pop(f"correct_{head}")
        metrics[f"train_acc_{head}"] = correct / labelled if labelled > 0 else float("nan")
    throughput = dist.all_reduce_sum(torch.tensor([n_images / elapsed], device=device))
    metrics["images_per_s"] = float(throughput[0])
    metrics["epoch_time_s"] = elapsed
    metrics["lr"] = state.optimizer.param_groups[0]["lr"]
    return metrics


@torch.no_grad()
def warm_up_bn(core: AMDIM, batches, device: torch.device, n_batches: int) -> int:
    """Spec 6.2's BN warm-up: ``n_batches`` forward passes of the encoder and probes in train mode
    (no labels, no gradients) over ``batches``, cycled if it has fewer, so that every BatchNorm's
    running statistics describe these images. Batches of one image are skipped (train-mode BN on a
    1x1 map needs two). Returns the number of passes made."""
    was_training = core.training
    core.train()
    done = 0
    while done < n_batches:
        before = done
        for x, _ in batches:
            if x.shape[0] < 2:
                continue
            core.probes(core.encoder(x.to(device, non_blocking=True))[0].flatten(1))
            done += 1
            if done == n_batches:
                break
        if done == before:  # nothing usable in the loader
            break
    core.train(was_training)
    return done


@torch.no_grad()
def evaluate_online(
    core: AMDIM, batches, device: torch.device, dist: DistContext, split: str = "test"
) -> dict[str, float]:
    """Top-1 accuracy of the online probes on ``batches`` (the test set, or the online validation
    split) as ``{split}_acc_lin`` and ``{split}_acc_mlp``; encoder and probes in eval mode."""
    was_training = core.training
    core.eval()
    counts = torch.zeros(3, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lin, mlp = core.probes(core.encoder(x)[0].flatten(1))
        lin_ok, n = correct_and_count(lin, y)
        mlp_ok, _ = correct_and_count(mlp, y)
        counts += torch.stack([lin_ok, mlp_ok, n])
    core.train(was_training)
    counts = dist.all_reduce_sum(counts)
    n = float(counts[2])
    return {
        f"{split}_acc_lin": float(counts[0]) / n if n else math.nan,
        f"{split}_acc_mlp": float(counts[1]) / n if n else math.nan,
    }


def knn_bank_indices(train_idx: Tensor, labels: Tensor, size: int, seed: int) -> Tensor:
    """The kNN bank: labelled training images outside the online validation split, a seeded
    subset of ``size`` of them when there are more (the same subset every epoch)."""
    idx = train_idx[labels[train_idx] >= 0]
    if len(idx) > size:
        keep = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:size]
        idx = idx[keep.sort().values]
    return idx


@torch.no_grad()
def validation_signals(
    core: AMDIM,
    bundle: data_mod.DataBundle,
    labels: Tensor,
    val_idx: Tensor,
    train_idx: Tensor,
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    """``val_acc_knn`` and ``rankme`` of the online validation split (see amdim.signals), from the
    r1 features of un-augmented images (test transform, encoder in eval mode), and the seconds they
    took (``signals_time_s``, the bank's embedding included). ``labels`` are the training set's
    real labels (the bundle's hide the split's)."""
    from amdim.linear_eval import extract_features
    from amdim.signals import knn_accuracy, rankme

    t0 = time.perf_counter()

    def features(idx: Tensor) -> tuple[Tensor, Tensor]:
        batches = data_mod.eval_loader(
            bundle.train_images, labels, cfg.aug, cfg.model.image_size, cfg.data.batch_size,
            bundle.mean, bundle.std, indices=idx,
        )  # fmt: skip
        return extract_features(core.encoder, batches, device)

    val_x, val_y = features(val_idx)
    out = {"rankme": rankme(val_x)}
    if cfg.train.knn_bank > 0:
        bank_x, bank_y = features(knn_bank_indices(train_idx, labels, cfg.train.knn_bank, cfg.train.seed))
        t = cfg.train
        out["val_acc_knn"] = knn_accuracy(
            val_x, val_y, bank_x, bank_y, bundle.n_classes, k=t.knn_k, temperature=t.knn_temperature
        )
    out["signals_time_s"] = time.perf_counter() - t0
    return out


EpochCallback = Callable[[dict[str, float], Callable[[], dict[str, Any]]], None]


def fit(
    cfg: Config,
    *,
    bundle: data_mod.DataBundle | None = None,
    resume: dict[str, Any] | None = None,
    dist: DistContext | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    on_epoch_end: EpochCallback | None = None,
    log: Callable[[str], None] | None = print,
    device: torch.device | None = None,
    on_step: Callable[[TrainState, int], None] | None = None,
) -> TrainState:
    """Train ``cfg.train.epochs`` epochs (continuing from ``resume`` when given).

    Args:
        cfg: the full configuration.
        bundle: preloaded data (loaded from ``cfg.data.spec`` when None).
        resume: a checkpoint payload to continue from.
        dist: rank and world size when running as one process of a group.
        wrap_model: e.g. DDP; applied after the model is on its device, before ``torch.compile``.
        on_epoch_end: called with (epoch metrics, payload factory) after every epoch on every rank.
        log: a line logger (rank 0 only is sensible).
        device: overrides ``cfg.train.device`` (a Ray worker is told its device by Ray).
        on_step: called after every optimiser step with (state, step index in the epoch).
    """
    dist = dist or DistContext()
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(epoch_seed(cfg.train.seed, -1, 0))  # identical initial weights on every rank
    bundle = bundle or data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    val_labels, val_idx = bundle.train_labels, None
    if cfg.data.online_val_fraction > 0:
        bundle, val_idx = data_mod.hold_out_online_val(bundle, cfg.data.online_val_fraction, cfg.train.seed)
    train_idx = None  # the training images outside the held-out split (all when there is none)
    if val_idx is not None:
        keep = torch.ones(len(val_labels), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().flatten()
    core = AMDIM(cfg.model, cfg.loss, bundle.n_classes).to(device)
    core = speed.prepare(core, speed.resolve(cfg.train, cfg.optim, device), device)
    optimizer = build_optimizer(core, cfg, device)
    steps_per_epoch = data_mod.steps_per_epoch(bundle, cfg.data, dist.world_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    model: nn.Module = core
    if wrap_model is not None:
        model = wrap_model(model)
    if cfg.train.compile:
        # After the DDP wrap, as PyTorch documents: compile then sees DDP's bucket hooks and
        # splits the graph at them, so the gradient all-reduce overlaps the backward pass.
        model = torch.compile(model, backend=cfg.train.compile_backend)
    state = TrainState(model=model, core=core, optimizer=optimizer, scheduler=scheduler)
    if resume is not None:
        restore(state, resume)
    two_views = device_views(cfg, bundle)

    while state.epoch < cfg.train.epochs:
        torch.manual_seed(epoch_seed(cfg.train.seed, state.epoch, dist.rank))
        batches = data_mod.train_loader(
            bundle, cfg.data, cfg.aug, cfg.model.image_size,
            seed=cfg.train.seed, epoch=state.epoch, rank=dist.rank, world_size=dist.world_size,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        batches = data_mod.DevicePrefetcher(batches, device)  # CUDA: copies the next batch during this step
        metrics = train_one_epoch(state, iter(batches), two_views, cfg, device, dist, log, on_step)
        t_eval = time.perf_counter()
        test_batches = data_mod.eval_loader(
            bundle.test_images, bundle.test_labels, cfg.aug, cfg.model.image_size, cfg.data.batch_size,
            bundle.mean, bundle.std, rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        warm = cfg.train.eval_bn_warmup
        if warm == "train":  # shuffled training images (not the held-out ones), test transform
            warm_batches = data_mod.eval_loader(
                bundle.train_images, bundle.train_labels, cfg.aug, cfg.model.image_size, cfg.data.batch_size,
                bundle.mean, bundle.std, rank=dist.rank, world_size=dist.world_size, drop_last=True,
                shuffle_seed=epoch_seed(cfg.train.seed, state.epoch, 7), indices=train_idx,
            )  # fmt: skip
            warm_up_bn(core, warm_batches, device, cfg.train.eval_bn_warmup_batches)
        if warm == "eval":
            warm_up_bn(core, test_batches, device, cfg.train.eval_bn_warmup_batches)
        metrics.update(evaluate_online(core, test_batches, device, dist))
        if val_idx is not None:
            val_batches = data_mod.eval_loader(
                bundle.train_images, val_labels, cfg.aug, cfg.model.image_size, cfg.data.batch_size,
                bundle.mean, bundle.std, rank=dist.rank, world_size=dist.world_size, indices=val_idx,
            )  # fmt: skip
            if warm == "eval":
                warm_up_bn(core, val_batches, device, cfg.train.eval_bn_warmup_batches)
            metrics.update(evaluate_online(core, val_batches, device, dist, split="val"))
            if dist.rank == 0:  # the signals are logged and reported from rank 0 only
                metrics.update(validation_signals(core, bundle, val_labels, val_idx, train_idx, cfg, device))
        metrics["eval_time_s"] = time.perf_counter() - t_eval  # BN warm-up and the online evaluations
        state.epoch += 1
        metrics["epoch"] = state.epoch
        state.history.append(metrics)
        if log is not None:
            log(
                f"epoch {state.epoch}/{cfg.train.epochs} loss {metrics['loss']:.4f} "
                f"nce {metrics['loss_nce']:.4f} online test acc lin {metrics['test_acc_lin']:.4f} "
                f"mlp {metrics['test_acc_mlp']:.4f}"
                + (f" val lin {metrics['val_acc_lin']:.4f}" if "val_acc_lin" in metrics else "")
                + f" {metrics['images_per_s']:.0f} img/s"
            )
        if on_epoch_end is not None:
            on_epoch_end(metrics, lambda: checkpoint_payload(cfg, state, bundle.n_classes))
    return state
