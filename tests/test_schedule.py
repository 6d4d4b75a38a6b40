import torch

from amdim.config import preset, with_overrides
from amdim.trainer import LRSchedule, build_optimizer, build_scheduler, milestone_epochs


def test_official_milestones_from_fractions():
    assert milestone_epochs(preset("cifar")) == [250, 280]
    assert milestone_epochs(preset("imagenet-small")) == [30, 45]
    assert milestone_epochs(with_overrides(preset("cifar"), {"train.epochs": 30})) == [25, 28]


def test_warmup_then_steps():
    s = LRSchedule(warmup_steps=500, milestone_steps=[1000, 2000], gamma=0.2)
    assert s(0) == 1 / 500 and s(249) == 0.5 and s(499) == 1.0 and s(999) == 1.0
    assert abs(s(1000) - 0.2) < 1e-12 and abs(s(2500) - 0.04) < 1e-12


def test_optimizer_matches_spec_and_scheduler_state_is_saveable():
    cfg = preset("cifar")  # the paper's Adam (the tiny preset's is tuned: docs/results.md)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    group = opt.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.8, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 1e-5
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    sched2 = build_scheduler(build_optimizer(model, cfg, torch.device("cpu")), cfg, steps_per_epoch=10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
