"""Data-parallel training on real 2-process gloo groups: every shipped setting trains under DDP,
the compiled DDP step equals the eager one, and the model freezes exactly what its loss never
reaches (which is what lets DDP keep ``find_unused_parameters=False``)."""

from __future__ import annotations

import copy
import itertools
import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amdim.config import NCE_PAIRS, preset, with_overrides
from amdim.model import AMDIM

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SMALL = {"model.ndf": 16, "model.n_rkhs": 64, "model.n_depth": 1, "model.mlp_hidden": 32}
PAIR_SETS = [c for n in (1, 2, 3) for c in itertools.combinations(NCE_PAIRS, n)]
MIXTURES = [(1, "1t7"), (2, "1t7"), (2, "1t5"), (3, "1t5,1t7")]


@pytest.mark.parametrize("mixture", MIXTURES, ids=lambda m: f"k{m[0]}-{m[1]}")
@pytest.mark.parametrize("pairs", PAIR_SETS, ids=lambda p: "+".join(p))
def test_frozen_parameters_are_exactly_those_no_loss_term_reaches(pairs, mixture):
    n_mix, mix_pairs = mixture
    cfg = with_overrides(
        preset("tiny"),
        {**SMALL, "loss.pairs": ",".join(pairs), "loss.n_mix": n_mix, "loss.mix_pairs": mix_pairs},
    )
    torch.manual_seed(0)
    model = AMDIM(cfg.model, cfg.loss, 10)
    reference = copy.deepcopy(model)  # the same model with nothing frozen for the loss
    for module in reference.unused_by_loss():
        module.requires_grad_(True)
    x1, x2 = torch.randn(2, 4, 3, 32, 32).unbind(0)
    labels = torch.tensor([0, 1, 2, 3])
    reference(x1, x2, labels)["loss"].backward()
    unreached = {n for n, p in reference.named_parameters() if not p.requires_grad or p.grad is None}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == unreached
    model(x1, x2, labels)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _shipped_points() -> list[tuple[str, str, dict]]:
    """(spec, label, flat overrides) of every labelled point of every shipped spec, at the smoke
    test's size (the spec's own base, on generated data)."""
    from amdim.harness.study_spec import load_spec, smoke_variant

    out = []
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        spec = load_spec(path, {"data.spec": "synthetic"})
        small = smoke_variant(spec)
        for point, label in zip(spec.points, spec.point_labels, strict=True):
            out.append((path.stem, label, small.trial_config(point)))
    return out


def _fit_ddp(rank: int, cfg):
    from amdim import data as data_mod
    from amdim import trainer
    from amdim.distributed import wrap_ddp

    return trainer.fit(
        cfg, bundle=data_mod.load_data(cfg.data.spec, cfg.model.image_size),
        dist=trainer.DistContext(rank, WORLD), log=None, device=torch.device("cpu"),
        wrap_model=lambda m: wrap_ddp(m, torch.device("cpu")),
    )  # fmt: skip


def _train_points(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    results = {}
    try:
        for spec, label, cfg in _shipped_points():
            try:
                _fit_ddp(rank, cfg)
                results[f"{spec}: {label}"] = "ok"
            except Exception:
                results[f"{spec}: {label}"] = traceback.format_exc(limit=3)
                break  # the other rank may wait in a collective of this point: stop both
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def test_every_shipped_spec_point_trains_on_two_ddp_workers(tmp_path):
    """Pair subsets, mixtures and every augmentation point: two steps each under DDP."""
    expected = [f"{spec}: {label}" for spec, label, _ in _shipped_points()]
    assert any("1t5 only" in e for e in expected) and any("mixtures" in e for e in expected)
    mp.spawn(_train_points, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        failed = {k: v for k, v in results.items() if v != "ok"}
        assert not failed, failed
        assert list(results) == expected


def _compile_worker(rank: int, store: str, out: str) -> None:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from amdim.bench import baseline_config
    from amdim.harness.study_spec import load_spec, smoke_variant

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    try:
        spec = smoke_variant(load_spec(ROOT / "studies" / "smoke.yaml", {"data.spec": "synthetic"}))
        # fp32 throughout (bf16 would hide a difference under its own), two epochs of two steps,
        # 1t7 left out so that a head is frozen too.
        cfg = with_overrides(baseline_config(spec.base), {"train.epochs": 2, "loss.pairs": "1t5,5t5"})
        eager = _fit_ddp(rank, cfg).history
        # Inductor draws dropout and the 5t5 locations from its own RNG unless told to use eager's.
        with inductor_config.patch(fallback_random=True):
            state = _fit_ddp(rank, with_overrides(cfg, {"train.compile": True}))
        torch._dynamo.reset()
        inner = type(state.model._orig_mod).__name__  # compile wraps DDP, not the reverse
        (Path(out) / f"rank{rank}.json").write_text(
            json.dumps({"eager": eager, "compiled": state.history, "compiled_module": inner})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_ddp_step_equals_the_eager_one(tmp_path):
    """DDP first, then torch.compile (the negatives' gather traced): the same two epochs of DDP
    steps give the same losses compiled and eager (the second epoch's after the first's updates)."""
    mp.spawn(_compile_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["compiled_module"] == "DistributedDataParallel"
        for key in ("loss", "loss_nce", "g2l_1t5", "g2l_5t5"):
            eager = [epoch[key] for epoch in got["eager"]]
            assert len(eager) == 2 and eager[0] != eager[1]
            assert [epoch[key] for epoch in got["compiled"]] == pytest.approx(eager, rel=1e-4), key


def _gather_worker(rank: int, store: str, out: str) -> None:
    from amdim.distributed import all_gather_with_grad

    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    try:

        def loss(x: torch.Tensor) -> torch.Tensor:
            return (all_gather_with_grad(x * 2.0) ** 2).sum() * (rank + 1)

        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        loss(x).backward()
        eager = x.grad.clone()
        x.grad = None
        torch.compile(loss, fullgraph=True)(x).backward()  # fullgraph: a graph break is an error
        torch.save({"eager": eager, "compiled": x.grad}, f"{out}/gather-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_negatives_gather_compiles_without_a_graph_break(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"gather-rank{rank}.pt")
        # d/dx_r of sum_r' (r'+1) * sum((2x)^2) over the gathered batch: 8 x_r * (1 + 2)
        torch.testing.assert_close(got["eager"], torch.full((2, 3), 24.0 * (rank + 1)))
        torch.testing.assert_close(got["compiled"], got["eager"])
