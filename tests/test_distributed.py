"""DDP port of the loss (spec 3.6) on a real 2-process gloo group: losses and gradients match one process.

Each rank encodes its half of a fixed batch with a tiny shared linear "encoder" W, gathers the
targets with :func:`all_gather_with_grad` and backpropagates its own loss. Expected:

- the mean of the rank losses equals the single-process loss on the whole batch;
- rank r's gradient w.r.t. its raw inputs is ``world_size`` times the single-process gradient of its
  slice: the gather's backward sums ``d L_r' / d x_r`` over all ranks r', i.e. it differentiates
  ``sum_r L_r = world_size * mean_r L_r``;
- hence the mean over ranks of the W gradients, which is what DDP's gradient averaging applies,
  equals the single-process gradient of W.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amdim.config import LossConfig
from amdim.distributed import all_gather_with_grad, world
from amdim.mixture import MixtureHead
from amdim.nce import multiscale_nce

WORLD = 2
B, D_IN, D = 6, 5, 8
CONFIGS = {
    "plain": LossConfig(tclip=5.0),
    "mix": LossConfig(tclip=5.0, n_mix=2, mix_alpha=0.5, mix_pairs=("1t5", "1t7")),
}


def _data():
    g = torch.Generator().manual_seed(0)
    raw = {s: torch.randn(2, B, D_IN, s, s, generator=g) for s in (1, 5, 7)}
    w = torch.randn(D, D_IN, generator=g)
    return raw, w


def _loss(raw, w, cfg, *, gather=None, rank_offset=0):
    """Encode both views with ``w`` (and a seeded mixture head) and return the loss dict."""
    views = [tuple(torch.einsum("oi,bihw->bohw", w, raw[s][v]) for s in (1, 5, 7)) for v in (0, 1)]
    mix = {}
    if cfg.n_mix > 1:
        torch.manual_seed(1)  # the same head weights on every rank and in the reference
        head = MixtureHead(D, cfg.n_mix)
        mix = {"mix_a": head(views[0][0]), "mix_b": head(views[1][0])}
    return multiscale_nce(
        views[0],
        views[1],
        cfg,
        gather=gather,
        rank_offset=rank_offset,
        generator=torch.Generator().manual_seed(5),  # shared seed: the same 5x5 draws everywhere
        **mix,
    )


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        assert world() == (rank, WORLD)
        raw, w = _data()
        lo = rank * (B // WORLD)
        results = {}
        for name, cfg in CONFIGS.items():
            local = {s: x[:, lo : lo + B // WORLD].clone().requires_grad_() for s, x in raw.items()}
            w_r = w.clone().requires_grad_()
            out = _loss(local, w_r, cfg, gather=all_gather_with_grad, rank_offset=lo)
            out["loss"].backward()
            results[name] = {
                "loss": out["loss"].detach(),
                "grad_w": w_r.grad,
                "grad_x": {s: x.grad for s, x in local.items()},
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_loss_and_gradients_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    raw, w = _data()
    half = B // WORLD
    for name, cfg in CONFIGS.items():
        x = {s: v.clone().requires_grad_() for s, v in raw.items()}
        w_ref = w.clone().requires_grad_()
        ref = _loss(x, w_ref, cfg)
        ref["loss"].backward()

        losses = torch.stack([r[name]["loss"] for r in ranks])
        torch.testing.assert_close(losses.mean(), ref["loss"].detach(), rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.isclose(losses[0], losses[1])  # the ranks really hold different halves
        grad_w = torch.stack([r[name]["grad_w"] for r in ranks]).mean(0)
        torch.testing.assert_close(grad_w, w_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
        for r, res in enumerate(ranks):
            for s, g in res[name]["grad_x"].items():
                expected = WORLD * x[s].grad[:, r * half : (r + 1) * half]
                torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=f"{name} rank {r} r{s}")


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert world() == (0, 1)
    assert all_gather_with_grad(x) is x


def _divergence_worker(rank, store_path, out_dir):
    from amdim.errors import DivergedError
    from amdim.trainer import DistContext, _check_finite

    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        ctx = DistContext(rank, WORLD)
        _check_finite(torch.tensor(-1), ctx, epoch=2, epoch_start_step=10)  # nobody diverged: no error
        # Only rank 1 saw a non-finite loss, at global step 13: every rank must stop there together.
        bad = torch.tensor(13 if rank == 1 else -1)
        try:
            _check_finite(bad, ctx, epoch=2, epoch_start_step=10)
            outcome = "went on"
        except DivergedError as exc:
            outcome = f"stopped at epoch {exc.epoch} step {exc.step}"
        (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    mp.spawn(_divergence_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert outcomes == ["stopped at epoch 2 step 3"] * WORLD
