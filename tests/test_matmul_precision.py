"""``train.matmul_precision``: how it resolves per device, the NCE scores from bf16 inputs against
full fp32 (loss and gradients within the tolerance amdim.speed states), and one score matmul per
target map for the pairs that share it, equal to one matmul per pair."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amdim import speed
from amdim.config import ConfigError, LossConfig, OptimConfig, TrainConfig, preset, with_overrides
from amdim.model import AMDIM
from amdim.nce import gather_locations, multiscale_nce, nce_log_probs, sample_locations, scores

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("value", "device", "expected"),
    [
        ("auto", CPU, "fp32"),
        ("auto", CUDA, "tf32"),
        ("tf32", CPU, "fp32"),  # TF32 is CUDA-only
        ("tf32", CUDA, "tf32"),
        ("fp32", CUDA, "fp32"),
        ("bf16", CPU, "bf16"),
        ("bf16", CUDA, "bf16"),
    ],
)
def test_matmul_precision_resolves_per_device_with_a_reason(value, device, expected):
    options = speed.resolve(TrainConfig(matmul_precision=value), OptimConfig(), device)
    assert options.matmul == expected
    assert options.as_dict()["matmul_precision"] == expected
    assert options.score_precision == ("bf16" if expected == "bf16" else "fp32")
    assert options.reasons["matmul"]


def test_a_bad_matmul_precision_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.matmul_precision"):
        with_overrides(preset("tiny"), {"train.matmul_precision": "fp8"})


def test_prepare_gives_the_model_its_score_precision():
    cfg = with_overrides(preset("tiny"), {"train.matmul_precision": "bf16"})
    core = AMDIM(cfg.model, cfg.loss, 10)
    assert core.score_precision == "fp32"
    core = speed.prepare(core, speed.resolve(cfg.train, cfg.optim, CPU), CPU)
    assert core.score_precision == "bf16"


def _loss_and_grads(precision: str):
    """One tiny-preset loss from fixed weights, images and 5t5 draws, and every gradient."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = AMDIM(cfg.model, cfg.loss, 10)
    model.score_precision = precision
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(32, 3, 32, 32, generator=g) for _ in range(2))
    labels = torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(2)  # the 5t5 draws and dropout
    out = model(x1, x2, labels)
    out["loss_nce"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# The tolerance amdim.speed states for train.matmul_precision=bf16: scores rounded to bf16 (8-bit
# mantissa) move the loss and each NCE term by under 1 %, the whole gradient by under 1 % of its
# norm, and each parameter's gradient by under 5 % of its norm (parameters whose gradient is
# nearly zero in fp32, such as a bias that shifts every target alike and cancels in the softmax,
# are only held to the whole-gradient bound).
LOSS_RTOL, GRAD_RTOL, PARAM_GRAD_RTOL = 1e-2, 1e-2, 5e-2


def test_bf16_scores_keep_the_loss_and_gradients_within_the_stated_tolerance():
    full, full_grads = _loss_and_grads("fp32")
    half, half_grads = _loss_and_grads("bf16")
    for key in ("loss_nce", "g2l_1t5", "g2l_1t7", "g2l_5t5", "reg"):
        a, b = float(full[key].detach()), float(half[key].detach())
        assert abs(a - b) <= LOSS_RTOL * abs(a), (key, a, b)
    assert full_grads.keys() == half_grads.keys() and full_grads
    flat_full = torch.cat([g.flatten() for g in full_grads.values()])
    flat_half = torch.cat([half_grads[n].flatten() for n in full_grads])
    assert float((flat_full - flat_half).norm() / flat_full.norm()) <= GRAD_RTOL
    largest = max(float(g.norm()) for g in full_grads.values())
    for name, ga in full_grads.items():
        if float(ga.norm()) < 1e-3 * largest:
            continue
        rel = float((ga - half_grads[name]).norm() / ga.norm())
        assert rel <= PARAM_GRAD_RTOL, (name, rel)
    # ... and bf16 really changed the arithmetic (the test could not pass with the fp32 path twice)
    assert float(full["loss_nce"].detach()) != float(half["loss_nce"].detach())


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_bf16_loss_stays_within_tolerance_when_scores_are_large(scale):
    """Scores of a trained encoder reach tens (the clip is at 20); rounding grows with them."""
    a, b = _features(0, n=16, d=64), _features(1, n=16, d=64)
    a, b = (tuple(scale * t for t in v) for v in (a, b))
    cfg = LossConfig(tclip=20.0, reg_weight=0.05)
    full = multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(5))
    half = multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(5), precision="bf16")
    assert scale < 4.0 or float(scores(a[0].flatten(1).unsqueeze(1), b[1].flatten(2)).abs().max()) > 20
    for key in ("loss", "g2l_1t5", "g2l_1t7", "g2l_5t5", "reg"):
        a_, b_ = float(full[key]), float(half[key])
        assert abs(a_ - b_) <= LOSS_RTOL * abs(a_), (key, a_, b_)


def test_bf16_scores_are_float32_and_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    src, trg = torch.randn(8, 2, 64, generator=g), torch.randn(8, 64, 25, generator=g)
    full, half = scores(src, trg), scores(src, trg, "bf16")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
    assert not torch.equal(half, full)
    with pytest.raises(ValueError, match="precision"):
        scores(src, trg, "fp16")


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _features(seed: int, n: int = 6, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, s, s, generator=g) for s in (1, 5, 7))


def _per_pair(a, b, cfg: LossConfig, generator, mix=None):
    """The loss as it was computed before the grouping: one nce_log_probs (one matmul) per pair
    and direction, the 5t5 draws a->b then b->a."""
    views, out, reg = (a, b), {}, 0.0
    bsz = a[0].shape[0]
    for pair in cfg.pairs:
        losses, regs = [], []
        for s_view, t_view in ((0, 1), (1, 0)):
            trg = views[t_view][1 if pair[2] == "5" else 2].flatten(2)
            if pair[0] == "1":
                src = mix[s_view] if mix else views[s_view][0].flatten(1).unsqueeze(1)
            else:
                idx = sample_locations(bsz, bsz, generator=generator)
                src = gather_locations(views[s_view][1], idx).unsqueeze(1)
            log_probs, r = nce_log_probs(src, trg, 0, cfg.tclip)
            losses.append(-log_probs.mean())
            regs.append(r)
        out[f"g2l_{pair}"] = 0.5 * (losses[0] + losses[1])
        reg = reg + 0.5 * (regs[0] + regs[1])
    out["reg"] = cfg.reg_weight * reg
    return out


@pytest.mark.parametrize("pairs", [("1t5", "1t7", "5t5"), ("5t5", "1t5"), ("1t5", "5t5", "1t7")])
def test_pairs_sharing_a_target_map_share_one_matmul_and_equal_one_matmul_per_pair(pairs):
    a, b = _features(0), _features(1)
    cfg = LossConfig(pairs=pairs, tclip=10.0, reg_weight=0.05)
    with _CountMatmuls() as counter:
        got = multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(5))
    maps = {pair[2] for pair in pairs}
    assert counter.n == 2 * len(maps)  # one per direction and target map, not one per pair
    ref = _per_pair(a, b, cfg, torch.Generator().manual_seed(5))
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_grouping_keeps_mixtures_per_component():
    cfg = LossConfig(pairs=("1t5", "5t5"), n_mix=3, mix_pairs=("1t5",), tclip=10.0)
    a, b = _features(2), _features(3)
    g = torch.Generator().manual_seed(4)
    mix_a, mix_b = (torch.randn(6, 3, 16, generator=g) for _ in range(2))
    got = multiscale_nce(a, b, cfg, mix_a=mix_a, mix_b=mix_b, generator=torch.Generator().manual_seed(5))
    # the 1t5 term from its own matmul: one nce_log_probs per direction over the 3 components
    from amdim.nce import mix_alpha, mixture_objective

    terms = []
    for src, trg in ((mix_a, b[1]), (mix_b, a[1])):
        log_probs, _ = nce_log_probs(src, trg.flatten(2), 0, cfg.tclip)
        terms.append(-mixture_objective(log_probs, mix_alpha(cfg))[0].mean())
    torch.testing.assert_close(got["g2l_1t5"], 0.5 * (terms[0] + terms[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "torch_setting"), [("auto", "high"), ("fp32", "highest"), ("bf16", "highest")]
)
def test_prepare_on_cuda_sets_tf32_as_resolved_and_turns_on_cudnn_autotuning(value, torch_setting):
    """The backend settings need no GPU to be set, so this runs on the CPU too."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    try:
        cfg = with_overrides(preset("tiny"), {"train.matmul_precision": value})
        core = AMDIM(cfg.model, cfg.loss, 10)
        speed.prepare(core, speed.resolve(cfg.train, cfg.optim, CUDA), CUDA)
        assert torch.get_float32_matmul_precision() == torch_setting
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_prepare_on_cpu_leaves_the_process_settings_alone():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    cfg = preset("tiny")
    speed.prepare(AMDIM(cfg.model, cfg.loss, 10), speed.resolve(cfg.train, cfg.optim, CPU), CPU)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
