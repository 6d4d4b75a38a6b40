"""The training step against the official amdim-public step of the same configuration, in one run.

    git clone https://github.com/Philip-Bachman/amdim-public /tmp/amdim-public
    python -m analysis.bench_official --official /tmp/amdim-public [--preset tiny] [--batch-size 64]

The official code is imported at run time from ``--official`` (a checkout of amdim-public; none
of it is part of this project). Three things let that 2019 GPU code run here, none of which
changes what its step computes: its ``mixed_precision`` module imports NVIDIA apex at import time,
which is not needed with mixed precision off (the official default), so a stand-in module named
``apex.fp16_utils`` is placed in ``sys.modules`` first; it uses uint8 masks, which PyTorch 2
refuses, so they are taken as bool; its loss moves masks with a bare ``.cuda()``, which returns
the CPU tensor, and counts GPUs to size its targets, which sees one (see ``_Legacy2019``, active
while the official model is built and runs forward). The official step is its training loop's
body (``task_self_supervised._train``): ``Model.forward`` on both views, the three NCE terms plus
the score regulariser, the two online classifiers' cross-entropy on both views, ``zero_grad``,
``backward``, Adam (betas 0.8/0.999, weight decay 1e-5, eps 1e-8) and the loop's ``.item()``
reads. The same fixed batch of views (this project's batched augmentation, on the CPU) goes
through every step; steps alternate, and images/s = batch / median step time.

Ours, each through :func:`amdim.trainer.train_one_epoch` as the trainer runs it: the default
configuration (its speed options as ``train.amp``/``train.channels_last``/``optim.fused`` resolve
on this machine), the best CPU options (``--best-set``, default bf16 where the CPU has native bf16,
channels_last, fused Adam, torch.compile) and the plain fp32 eager step. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from amdim import bench
from amdim.config import parse_set_args, preset, to_flat, with_overrides
from amdim.speed import cpu_description, native_cpu_bf16


def _import_official(path: Path):
    """The official ``model`` and ``costs`` modules, imported from the checkout at ``path``."""
    if not (path / "model.py").is_file() or not (path / "costs.py").is_file():
        raise SystemExit(f"--official {path}: not an amdim-public checkout (no model.py / costs.py)")
    fp16 = types.ModuleType("apex.fp16_utils")
    fp16.FP16_Optimizer = type("FP16_Optimizer", (), {})  # only used by isinstance checks
    apex = types.ModuleType("apex")
    apex.fp16_utils = fp16
    sys.modules.setdefault("apex", apex)
    sys.modules.setdefault("apex.fp16_utils", fp16)
    sys.path.insert(0, str(path))
    import costs
    import model as official_model

    return official_model, costs


class _Legacy2019:
    """While active, the two things the 2019 official code needs from PyTorch 1.x: uint8 masks
    taken as the bool masks they stand for (``masked_fill_``, ``masked_select``; PyTorch has
    refused them since bool tensors came), ``Tensor.cuda()`` returning the tensor itself, so that
    the masks its loss moves with a bare ``.cuda()`` (``costs.LossMultiNCE``) stay on the CPU with
    the rest of its step, and one GPU counted (its loss sizes the NCE targets it hands to
    ``nn.DataParallel`` by ``torch.cuda.device_count()``): the step of a single-GPU official run.
    None of it changes what the step computes."""

    def __enter__(self):
        self.fill, self.select, self.cuda = torch.Tensor.masked_fill_, torch.masked_select, torch.Tensor.cuda
        self.count = torch.cuda.device_count
        fill, select = self.fill, self.select

        def as_bool(mask):
            return mask.bool() if mask.dtype == torch.uint8 else mask

        torch.Tensor.masked_fill_ = lambda tensor, mask, value: fill(tensor, as_bool(mask), value)
        torch.masked_select = lambda tensor, mask, **kw: select(tensor, as_bool(mask), **kw)
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        torch.cuda.device_count = lambda: 1
        return self

    def __exit__(self, *exc):
        torch.Tensor.masked_fill_, torch.masked_select, torch.Tensor.cuda = self.fill, self.select, self.cuda
        torch.cuda.device_count = self.count


class _OfficialStep:
    """The body of the official training loop for one fixed batch."""

    def __init__(self, official_model, costs, cfg, n_classes: int, batch):
        m = cfg.model
        torch.manual_seed(0)
        with _Legacy2019(), contextlib.redirect_stdout(sys.stderr):  # it prints "Using a 32x32 encoder"
            self.model = official_model.Model(
                ndf=m.ndf, n_classes=n_classes, n_rkhs=m.n_rkhs, tclip=cfg.loss.tclip,
                n_depth=m.n_depth, encoder_size=m.image_size, use_bn=m.use_bn,
            )  # fmt: skip
            self.model.init_weights(init_scale=1.0)
        mods = [*self.model.info_modules, *self.model.class_modules]
        self.optim = torch.optim.Adam(
            [{"params": mod.parameters(), "lr": cfg.optim.lr} for mod in mods],
            betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-8,
        )  # fmt: skip
        self.loss_xent = costs.loss_xent
        self.x1, self.x2, labels = batch
        self.labels = torch.cat([labels, labels])
        self.losses: list[float] = []

    def __call__(self) -> None:
        with _Legacy2019():
            res = self.model(x1=self.x1, x2=self.x2, class_only=False)
        lgt_mlp, lgt_lin = res["class"]
        loss_g2l = res["g2l_1t5"] + res["g2l_1t7"] + res["g2l_5t5"]
        loss_inf = loss_g2l + res["lgt_reg"]
        loss_cls = self.loss_xent(lgt_mlp, self.labels) + self.loss_xent(lgt_lin, self.labels)
        loss = loss_inf + loss_cls
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        # The official loop reads every term back for its statistics (a host sync on a GPU).
        reads = [loss_inf, loss_cls, loss_g2l, res["lgt_reg"], res["g2l_1t5"], res["g2l_1t7"], res["g2l_5t5"]]
        self.stats = [r.item() for r in reads]
        self.losses.append(float(loss.item()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench_official", description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of amdim-public")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every step (the official model gets the same sizes)")  # fmt: skip
    p.add_argument("--best-set", action="append", default=None, metavar="KEY=VALUE",
                   help="the best options (default: bf16 if the CPU has it natively, channels_last, fused Adam, compile)")  # fmt: skip
    args = p.parse_args(argv)
    official_model, costs = _import_official(args.official.resolve())

    # The official online MLP classifier has 1024 hidden units and dropout 0.2; so does ours here.
    cfg = with_overrides(
        preset(args.preset),
        {"model.mlp_hidden": 1024, "model.mlp_dropout": 0.2, "data.batch_size": args.batch_size,
         "train.device": "cpu", **parse_set_args(args.overrides)},
    )  # fmt: skip
    best_sets = args.best_set or [
        f"train.amp={'bf16' if native_cpu_bf16() else 'off'}",
        "train.channels_last=true", "optim.fused=true", "train.compile=true",
    ]  # fmt: skip
    best = with_overrides(cfg, parse_set_args(best_sets))
    plain = bench.baseline_config(cfg)
    dev = torch.device("cpu")
    bundle = bench.data_mod.load_data(cfg.data.spec, cfg.model.image_size)
    batch = bench._fixed_views(cfg, bundle, args.batch_size, dev)
    n = args.warmup + args.steps
    steps = {
        "official": _OfficialStep(official_model, costs, cfg, bundle.n_classes, batch),
        "default": bench._Stepper(cfg, bundle.n_classes, dev, batch, n),
        "best": bench._Stepper(best, bundle.n_classes, dev, batch, n),
        "plain": bench._Stepper(plain, bundle.n_classes, dev, batch, n),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    chosen = steps["default"].options.as_dict()
    out = {
        "preset": args.preset,
        "batch": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": cpu_description(),
        "torch": torch.__version__,
        "official": str(args.official),
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "default_vs_official": round(rate["default"] / rate["official"], 3),
        "best_vs_official": round(rate["best"] / rate["official"], 3),
        "plain_vs_official": round(rate["plain"] / rate["official"], 3),
        "default_vs_plain": round(rate["default"] / rate["plain"], 3),
        "default_options": chosen,
        "best_options": best_sets,
        "first_losses": {k: round(v.losses[0], 4) for k, v in steps.items()},
        "config": {k: v for k, v in to_flat(cfg).items() if k.startswith("model.")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
