"""The two augmentation paths: same parameter distributions, same images for the same
parameters, the shared flip, and every knob reaching the output (spec sections 5.1-5.3)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from amdim import augment
from amdim.augment import BatchedTwoViews, TorchvisionTwoViews, build_two_views, param_at, stack_params
from amdim.config import AUG_CIFAR, AUG_IMAGENET, AUG_STL10, AugConfig

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
QUIET = replace(AUG_CIFAR, flip_p=0.0, translate_p=0.0, jitter_p=0.0, gray_p=0.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth colourful uint8 images with some pixel noise, (b, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(2, h // 6), max(2, w // 6), generator=g)
    x = torch.nn.functional.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)
    x = x + 0.08 * torch.randn(b, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def normalised(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float() / 255, list(MEAN), list(STD))


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_limit(n: int, m: int) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))  # alpha = 0.001


def draw_both(cfg: AugConfig, n: int, h: int, w: int, out: int) -> tuple[dict, dict]:
    """n parameter draws from each path, both in the batched layout, from fixed seeds."""
    tv, bt = TorchvisionTwoViews(cfg, out, MEAN, STD), BatchedTwoViews(cfg, out, MEAN, STD)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    torch.manual_seed(1234)
    ref = stack_params([tv.sample_params(img) for _ in range(n)])
    ours = bt.sample_params(n, h, w, "cpu", torch.Generator().manual_seed(5678))
    return ref, ours


def both_views(params: dict, key: str) -> torch.Tensor:
    return torch.cat([params["views"][0][key], params["views"][1][key]])


def freq(x: torch.Tensor) -> float:
    return float(x.float().mean())


# --- parameter distributions ------------------------------------------------------------------


def test_crop_and_jitter_parameters_have_the_same_distribution():
    n, side = 2500, 96
    ref, ours = draw_both(AUG_STL10, n, side, side, 64)
    for params in (ref, ours):
        crop = both_views(params, "crop").double()
        i, j, h, w = crop.unbind(1)
        params["stats"] = {
            "area": h * w / side**2,
            "aspect": w / h,
            "top": (i / (side - h))[h < side],
            "left": (j / (side - w))[w < side],
        }
        factors = both_views(params, "factors")
        params["stats"].update({op: factors[:, k] for k, op in enumerate(augment.OPS)})
    limit = ks_limit(2 * n, 2 * n)
    for name in ref["stats"]:
        a, b = ref["stats"][name], ours["stats"][name]
        assert ks(a, b) < ks_limit(len(a), len(b)), name
    # Areas stay in the scale range up to rounding (rejections bend the shape, so no U[0.3, 1]
    # check); hue follows U[-0.2, 0.2].
    area = ours["stats"]["area"]
    assert area.min() > 0.28 and area.max() <= 1.0 and area.max() > 0.95
    assert ks(ours["stats"]["hue"], -0.2 + 0.4 * torch.rand(4 * n)) < limit
    for key, p in (("jitter", 0.8), ("gray", 0.25)):
        assert abs(freq(both_views(ref, key)) - p) < 0.03, key
        assert abs(freq(both_views(ours, key)) - p) < 0.03, key
    assert abs(freq(ref["flip"]) - 0.5) < 0.04 and abs(freq(ours["flip"]) - 0.5) < 0.04


def test_jitter_op_order_is_a_uniform_permutation_in_both_paths():
    ref, ours = draw_both(AUG_CIFAR, 2500, 32, 32, 32)
    for params in (ref, ours):
        order = both_views(params, "order")
        assert torch.equal(order.sort(1).values, torch.arange(4).expand_as(order))
        # How often each op lands at each position: 1/4 everywhere.
        at = torch.stack([(order == op).float().mean(0) for op in range(4)])
        assert (at - 0.25).abs().max() < 0.03
        # All 24 orders occur about equally often.
        codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
        counts = torch.bincount(codes, minlength=256)[torch.bincount(codes, minlength=256) > 0]
        assert len(counts) == 24
        assert (counts.float() / len(order) - 1 / 24).abs().max() < 0.015


def test_translation_parameters_have_the_same_distribution():
    ref, ours = draw_both(AUG_CIFAR, 3000, 32, 32, 32)
    expected = torch.full((9,), 0.8 / 9)
    expected[4] += 0.2  # not applied: (0, 0)
    for params in (ref, ours):
        shift = both_views(params, "translate")
        for axis in range(2):
            hist = torch.bincount(shift[:, axis] + 4, minlength=9).float() / len(shift)
            assert (hist - expected).abs().max() < 0.02
        assert torch.equal(both_views(params, "crop"), torch.tensor([0, 0, 32, 32]).expand(len(shift), 4))
    assert ks(both_views(ref, "translate")[:, 0], both_views(ours, "translate")[:, 0]) < ks_limit(6000, 6000)


def test_crop_fallback_matches_on_a_wide_image():
    # A 32 x 96 image is wider than ratio 1.4 allows for large areas: many draws fall back to
    # the central 32 x 45 crop after 10 failed tries.
    ref, ours = draw_both(AUG_STL10, 3000, 32, 96, 64)
    rates = []
    for params in (ref, ours):
        crop = both_views(params, "crop")
        assert (crop[:, 2] <= 32).all() and (crop[:, 3] <= 96).all()
        fallback = (crop == torch.tensor([0, (96 - 45) // 2, 32, 45])).all(1)
        rates.append(freq(fallback))
    assert rates[0] > 0.01 and abs(rates[0] - rates[1]) < 0.01
    ratio = [both_views(p, "crop")[:, 3] / both_views(p, "crop")[:, 2] for p in (ref, ours)]
    assert ks(*ratio) < ks_limit(6000, 6000)


# --- same images for the same parameters ------------------------------------------------------

SEMANTICS_CASES = {
    "translate+jitter": (replace(AUG_CIFAR, translate_p=1.0, jitter_p=1.0, gray_p=0.3), 32, 32),
    "cifar": (AUG_CIFAR, 32, 32),
    "crop-downscale": (replace(AUG_STL10, jitter_p=1.0), 96, 64),
    "crop-upscale": (AUG_STL10, 40, 64),
    "imagenet-hue": (replace(AUG_IMAGENET, crop_scale_min=0.1), 72, 48),
    "strong-jitter": (replace(AUG_CIFAR, jitter_strength=2.0, jitter_p=1.0), 32, 32),
}


@pytest.mark.parametrize("case", sorted(SEMANTICS_CASES))
def test_both_paths_make_the_same_images_from_the_same_parameters(case):
    # Measured: <= 1e-5 everywhere, crops included, since the batched crop reproduces torch's
    # antialiased bicubic weights; 1e-3 leaves room for other CPUs' float ordering.
    cfg, side, out = SEMANTICS_CASES[case]
    tv, bt = TorchvisionTwoViews(cfg, out, MEAN, STD), BatchedTwoViews(cfg, out, MEAN, STD)
    x = images(24, side, side, seed=3)
    batched_params = bt.sample_params(24, side, side, "cpu", torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    per_image_params = [tv.sample_params(x[k]) for k in range(24)]
    for params, per_image in ((batched_params, None), (stack_params(per_image_params), per_image_params)):
        y1, y2 = bt.apply(x, params)
        for k in range(24):
            r1, r2 = tv.apply(x[k], per_image[k] if per_image else param_at(params, k))
            assert (r1 - y1[k]).abs().max() < 1e-3 and (r2 - y2[k]).abs().max() < 1e-3, k


def test_param_layouts_round_trip():
    bt = BatchedTwoViews(AUG_STL10, 64, MEAN, STD)
    params = bt.sample_params(5, 96, 96, "cpu", torch.Generator().manual_seed(0))
    again = stack_params([param_at(params, k) for k in range(5)])
    assert torch.equal(again["flip"], params["flip"])
    for v in range(2):
        for key, value in params["views"][v].items():
            assert torch.equal(again["views"][v][key], value), key


def test_hue_rotation_matches_torchvision():
    x = images(4, 16, 16, seed=7).float() / 255
    x[0, :, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # pure red
    x[1, :, :4] = 0.5  # grey: hue undefined, must stay grey
    x[2] = x[2] * 0  # black
    for shift in (-0.5, -0.2, 0.0, 0.13, 0.5):
        ours = augment._adjust_hue(x, torch.full((4,), shift))
        assert (ours - F.adjust_hue(x, shift)).abs().max() < 1e-5, shift
    assert (augment.hsv_to_rgb(augment.rgb_to_hsv(x)) - x).abs().max() < 1e-6


# --- views, flips, knobs, devices -------------------------------------------------------------


@pytest.mark.parametrize("impl", ["batched", "torchvision"])
def test_flip_is_shared_by_both_views(impl):
    aug = build_two_views(replace(QUIET, flip_p=0.5, impl=impl), 32, MEAN, STD)
    x = images(64, 32, 32, seed=1)
    if impl == "batched":
        v1, v2 = aug(x, torch.Generator().manual_seed(0))
    else:
        torch.manual_seed(0)
        v1, v2 = (torch.stack(v) for v in zip(*(aug(img) for img in x)))
    plain, flipped = normalised(x), normalised(x.flip(-1))
    assert torch.equal(v1, v2)
    is_flipped = (v1 - flipped).flatten(1).abs().amax(1) < 1e-6
    is_plain = (v1 - plain).flatten(1).abs().amax(1) < 1e-6
    assert (is_flipped ^ is_plain).all()
    assert 0.3 < freq(is_flipped) < 0.7


def test_flip_p_one_flips_every_image():
    aug = BatchedTwoViews(replace(QUIET, flip_p=1.0), 32, MEAN, STD)
    x = images(8, 32, 32)
    v1, v2 = aug(x)
    assert (v1 - normalised(x.flip(-1))).abs().max() < 1e-6 and torch.equal(v1, v2)


@pytest.mark.parametrize("cfg", [AUG_CIFAR, AUG_STL10], ids=["cifar", "stl10"])
def test_default_views_differ(cfg):
    side = 32 if not cfg.crop else 96
    out = 32 if not cfg.crop else 64
    v1, v2 = BatchedTwoViews(cfg, out, MEAN, STD)(images(64, side, side), torch.Generator().manual_seed(0))
    differ = (v1 - v2).flatten(1).abs().amax(1) > 1e-3
    assert freq(differ) > 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_output_shapes_dtypes_and_devices(device):
    x = images(6, 96, 96).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    for cfg, out in ((AUG_STL10, 64), (AUG_CIFAR, 32)):
        v1, v2 = BatchedTwoViews(cfg, out, MEAN, STD)(x, gen)
        for v in (v1, v2):
            assert v.shape == (6, 3, out, out) and v.dtype == torch.float32 and v.device.type == device
            assert torch.isfinite(v).all()
    w1, w2 = TorchvisionTwoViews(AUG_STL10, 64, MEAN, STD)(x[0].cpu())
    assert w1.shape == w2.shape == (3, 64, 64) and w1.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_matches_cpu_for_the_same_parameters():
    bt = BatchedTwoViews(replace(AUG_STL10, jitter_p=1.0), 64, MEAN, STD)
    x = images(16, 96, 96)
    params = bt.sample_params(16, 96, 96, "cpu", torch.Generator().manual_seed(0))
    on_cuda = stack_params([param_at(params, k) for k in range(16)], device="cuda")
    for a, b in zip(bt.apply(x, params), bt.apply(x.cuda(), on_cuda)):
        assert (a - b.cpu()).abs().max() < 1e-3


@pytest.mark.parametrize("impl", ["batched", "torchvision"])
def test_all_probabilities_zero_gives_the_normalised_input(impl):
    aug = build_two_views(replace(QUIET, impl=impl), 32, MEAN, STD)
    x = images(4, 32, 32)
    v1, v2 = aug(x) if impl == "batched" else (torch.stack(v) for v in zip(*(aug(img) for img in x)))
    assert (v1 - normalised(x)).abs().max() < 1e-6 and (v2 - normalised(x)).abs().max() < 1e-6


def test_gray_p_one_makes_channels_equal():
    aug = BatchedTwoViews(replace(AUG_CIFAR, gray_p=1.0), 32, MEAN, STD)
    v1, _ = aug(images(8, 32, 32))
    raw = v1 * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert (raw[:, 0] - raw[:, 1]).abs().max() < 1e-5 and (raw[:, 1] - raw[:, 2]).abs().max() < 1e-5


def test_jitter_strength_reaches_the_output():
    x = images(16, 32, 32)
    outs = {}
    for strength in (0.0, 1.0):
        cfg = replace(QUIET, jitter_p=1.0, jitter_strength=strength)
        outs[strength] = BatchedTwoViews(cfg, 32, MEAN, STD)(x, torch.Generator().manual_seed(0))[0]
    assert (outs[0.0] - normalised(x)).abs().max() < 1e-6  # zero strength: jitter is identity
    assert (outs[1.0] - normalised(x)).abs().mean() > 0.05


def test_translate_px_reaches_the_output_with_reflection():
    x = images(2, 32, 32)
    aug = BatchedTwoViews(replace(QUIET, translate_p=1.0, translate_px=3), 32, MEAN, STD)
    params = aug.sample_params(2, 32, 32)
    for view in params["views"]:
        view["translate"] = torch.tensor([[3, -2], [0, 0]])
    v1, _ = aug.apply(x, params)
    expected = torch.nn.functional.pad(normalised(x[:1]), (3, 3, 3, 3), mode="reflect")[..., 5:37, 0:32]
    assert (v1[:1] - expected).abs().max() < 1e-6  # content moved 3 right and 2 up
    assert (v1[1] - normalised(x[1])).abs().max() < 1e-6


def test_same_generator_seed_same_views():
    aug = BatchedTwoViews(AUG_STL10, 64, MEAN, STD)
    x = images(8, 96, 96)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


# --- test transform and factory ---------------------------------------------------------------


def test_test_transform_resizes_centre_crops_and_normalises():
    x = images(3, 96, 96)
    single = augment.test_transform(x[0], AUG_STL10, 64, MEAN, STD)
    batch = BatchedTwoViews(AUG_STL10, 64, MEAN, STD).test_transform(x)
    assert single.shape == (3, 64, 64) and batch.shape == (3, 3, 64, 64)
    assert (batch[0] - single).abs().max() < 1e-6
    resized = F.resize(x.float() / 255, [70], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    expected = F.normalize(F.center_crop(resized.clamp(0, 1), [64, 64]), list(MEAN), list(STD))
    assert (batch - expected).abs().max() < 1e-6
    # CIFAR: no resize, just normalise; a different size is resized to the output size.
    small = images(2, 32, 32)
    assert (augment.test_transform(small, AUG_CIFAR, 32, MEAN, STD) - normalised(small)).abs().max() < 1e-6
    assert augment.test_transform(images(2, 40, 40), AUG_CIFAR, 32, MEAN, STD).shape == (2, 3, 32, 32)


def test_build_two_views_follows_impl_and_validates():
    assert isinstance(build_two_views(AUG_CIFAR, 32, MEAN, STD), BatchedTwoViews)
    tv = build_two_views(replace(AUG_CIFAR, impl="torchvision"), 32, MEAN, STD)
    assert isinstance(tv, TorchvisionTwoViews)
    with pytest.raises(ValueError, match="impl"):
        build_two_views(replace(AUG_CIFAR, impl="pil"), 32, MEAN, STD)
    with pytest.raises(ValueError, match="std"):
        BatchedTwoViews(AUG_CIFAR, 32, MEAN, (0.2, 0.0, 0.2))
