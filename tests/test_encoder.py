"""Tests for amdim.encoder against the layer tables, taps, parameter counts and init of spec section 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amdim.config import ModelConfig
from amdim.encoder import (
    Conv3x3,
    ConvResBlock,
    ConvResNxN,
    Encoder,
    FakeRKHSConvNet,
    MaybeBatchNorm2d,
    count_parameters,
)

NDF, RKHS, DEPTH, BATCH = 8, 64, 2, 2


def small_encoder(image_size: int, use_bn: bool = False) -> Encoder:
    torch.manual_seed(0)
    return Encoder(ModelConfig(image_size=image_size, ndf=NDF, n_rkhs=RKHS, n_depth=DEPTH, use_bn=use_bn))


def images(image_size: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))


# (C, H) of every trunk layer's output, transcribed from the spec section 2.2 tables (C in units).
D = NDF
LAYER_TABLES = {
    32: [(D, 30), (D, 30), (2 * D, 14), (4 * D, 7), (4 * D, 7), (4 * D, 5), (4 * D, 3), (RKHS, 1), (RKHS, 1)],
    64: [
        (D, 62),
        (2 * D, 30),
        (4 * D, 14),
        (8 * D, 7),
        (8 * D, 7),
        (8 * D, 5),
        (8 * D, 3),
        (RKHS, 1),
        (RKHS, 1),
    ],
    128: [
        (D, 64),
        (D, 62),
        (2 * D, 30),
        (4 * D, 14),
        (8 * D, 7),
        (8 * D, 7),
        (8 * D, 5),
        (8 * D, 3),
        (RKHS, 1),
        (RKHS, 1),
    ],
}


@pytest.mark.parametrize("size", [32, 64, 128])
def test_layer_output_shapes_match_spec_tables(size: int) -> None:
    enc = small_encoder(size)
    with torch.no_grad():
        outs = enc.layer_outputs(images(size))
    got = [tuple(o.shape) for o in outs]
    want = [(BATCH, c, h, h) for c, h in LAYER_TABLES[size]]
    assert got == want


@pytest.mark.parametrize("size", [32, 64, 128])
def test_embedding_shapes_and_taps(size: int) -> None:
    enc = small_encoder(size)
    x = images(size)
    with torch.no_grad():
        outs = enc.layer_outputs(x)
        r1, r5, r7 = enc(x)
    assert r1.shape == (BATCH, RKHS, 1, 1)
    assert r5.shape == (BATCH, RKHS, 5, 5)
    assert r7.shape == (BATCH, RKHS, 7, 7)
    # The official rule (spec 2.3): each tap is the LAST layer whose output has that spatial size.
    last_with = {o.shape[-1]: i for i, o in enumerate(outs)}
    assert (enc.tap_5, enc.tap_7) == (last_with[5], last_with[7])
    assert last_with[1] == len(enc.layers) - 1
    assert isinstance(enc.layers[enc.tap_7], MaybeBatchNorm2d)
    assert isinstance(enc.layers[enc.tap_5], ConvResBlock)
    assert isinstance(enc.layers[-1], nn.BatchNorm2d)
    # r1 is the final BN output itself: no head, no L2 normalisation.
    torch.testing.assert_close(r1, outs[-1])
    with torch.no_grad():
        torch.testing.assert_close(r5, enc.rkhs_5(outs[enc.tap_5]))
        torch.testing.assert_close(r7, enc.rkhs_7(outs[enc.tap_7]))


def test_128px_stem_is_reflect_padded_k5_s2_then_k3() -> None:
    enc = small_encoder(128)
    stem, second = enc.layers[0], enc.layers[1]
    assert isinstance(stem, Conv3x3) and isinstance(second, Conv3x3)
    assert isinstance(stem.pad, nn.ReflectionPad2d) and stem.pad.padding == (2, 2, 2, 2)
    assert stem.conv.kernel_size == (5, 5) and stem.conv.stride == (2, 2) and stem.conv.padding == (0, 0)
    assert second.conv.kernel_size == (3, 3) and second.conv.stride == (1, 1)


@pytest.mark.parametrize(
    ("cfg", "total_m", "trunk_m"),
    [
        ((32, 128, 1024, 3), 20.1, 15.8),
        ((32, 256, 2048, 10), 127.9, None),
        ((32, 320, 1280, 10), 163.8, 153.9),
        ((64, 192, 1536, 8), 208.2, 194.0),
        ((128, 128, 1024, 6), 78.8, 72.5),
        ((128, 192, 1536, 8), 208.5, 194.4),
        ((128, 256, 2048, 10), 426.3, 401.1),
        ((128, 320, 2560, 10), 666.0, 626.6),
    ],
)
def test_parameter_counts_match_spec_2_6(
    cfg: tuple[int, int, int, int], total_m: float, trunk_m: float | None
) -> None:
    size, ndf, n_rkhs, depth = cfg
    # On the meta device no memory is allocated, so even the 666 M model builds instantly.
    with torch.device("meta"):
        enc = Encoder(ModelConfig(image_size=size, ndf=ndf, n_rkhs=n_rkhs, n_depth=depth))
    assert round(count_parameters(enc) / 1e6, 1) == total_m
    if trunk_m is not None:
        assert round(sum(p.numel() for p in enc.trunk_parameters()) / 1e6, 1) == trunk_m
    assert count_parameters(enc) == count_parameters(enc.layers) + 2 * count_parameters(enc.rkhs_5)


def reference_shortcut(x: torch.Tensor, n_out: int, width: int, stride: int, pad: int) -> torch.Tensor:
    pooled = F.avg_pool2d(x, width, stride, pad)
    zeros = pooled.new_zeros(pooled.shape[0], n_out - pooled.shape[1], *pooled.shape[2:])
    return torch.cat([pooled, zeros], dim=1)


@pytest.mark.parametrize(
    ("n_in", "n_out", "width", "stride", "pad", "hw"),
    [(4, 4, 1, 1, 0, 6), (4, 8, 4, 2, 0, 30), (8, 16, 2, 2, 0, 14), (8, 8, 3, 1, 0, 7), (8, 12, 3, 1, 1, 5)],
)
def test_fresh_residual_unit_equals_its_shortcut(
    n_in: int, n_out: int, width: int, stride: int, pad: int, hw: int
) -> None:
    torch.manual_seed(0)
    unit = ConvResNxN(n_in, n_out, width, stride, pad)
    x = torch.randn(3, n_in, hw, hw)
    want = reference_shortcut(x, n_out, width, stride, pad)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), want)
        # Once conv2 is non-zero, the branch contributes.
        unit.conv2.weight.normal_()
        assert not torch.allclose(unit(x), want)
        unit.init_weights()
        torch.testing.assert_close(unit(x), want)


def test_residual_unit_has_no_relu_on_input_or_output() -> None:
    # A fresh unit is a linear map (avg pool), so negative inputs give negative outputs.
    unit = ConvResNxN(4, 4, 2, 2, 0)
    x = -torch.ones(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), -torch.ones(1, 4, 2, 2))


def test_residual_unit_rejects_fewer_output_channels() -> None:
    with pytest.raises(ValueError, match="n_out must be >= n_in"):
        ConvResNxN(8, 4, 1)


def test_res_block_has_one_spatial_unit_then_1x1_units() -> None:
    block = ConvResBlock(4, 8, 4, 2, 0, depth=3)
    units = list(block.layer_list)
    assert len(units) == 3
    assert units[0].conv1.kernel_size == (4, 4) and units[0].conv1.stride == (2, 2)
    assert all(u.conv1.kernel_size == (1, 1) and u.conv1.stride == (1, 1) for u in units[1:])
    assert [(u.n_in, u.n_out) for u in units] == [(4, 8), (8, 8), (8, 8)]


@pytest.mark.parametrize("size", [32, 128])
def test_new_encoder_has_zero_conv2_and_default_conv1(size: int) -> None:
    enc = small_encoder(size)
    blocks = [m for m in enc.modules() if isinstance(m, (ConvResNxN, FakeRKHSConvNet))]
    assert len(blocks) > 0
    for m in blocks:
        assert torch.count_nonzero(m.conv2.weight) == 0
        fan_in = m.conv1.weight[0].numel()
        assert m.conv1.weight.abs().max() <= 1 / fan_in**0.5  # kaiming_uniform_(a=sqrt(5)) bound
        assert m.conv1.weight.abs().max() > 0.5 / fan_in**0.5


def test_init_weights_scales_conv1_and_rezeroes_conv2() -> None:
    enc = small_encoder(32)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    enc.init_weights(init_scale=0.1)
    for m in enc.modules():
        if isinstance(m, (ConvResNxN, FakeRKHSConvNet)):
            assert torch.count_nonzero(m.conv2.weight) == 0
            assert m.conv1.weight.abs().max() <= 0.1 / m.conv1.weight[0].numel() ** 0.5


def test_fake_rkhs_shortcut_is_near_identity() -> None:
    torch.manual_seed(0)
    head = FakeRKHSConvNet(16, 32)
    w = head.shortcut.weight[:, :, 0, 0]
    assert w.shape == (32, 16)
    assert head.shortcut.bias is not None
    idx = torch.arange(16)
    assert torch.equal(w[idx, idx], torch.ones(16))
    off = torch.ones_like(w, dtype=torch.bool)
    off[idx, idx] = False
    assert w[off].abs().max() <= 0.01
    assert w[off].abs().max() > 0.005  # really U(-0.01, 0.01), not zeros
    # A fresh head is BN(shortcut(x)): the branch starts at zero.
    x = torch.randn(4, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.bn_out(head.shortcut(x)))


def _maybe_bns(enc: Encoder) -> list[MaybeBatchNorm2d]:
    return [m for m in enc.modules() if isinstance(m, MaybeBatchNorm2d)]


def _scramble_running_stats(modules: list[MaybeBatchNorm2d]) -> None:
    with torch.no_grad():
        for m in modules:
            m.bn.running_mean.normal_(0.0, 3.0)
            m.bn.running_var.uniform_(5.0, 10.0)
            m.bn.weight.uniform_(2.0, 3.0)


@pytest.mark.parametrize("size", [32, 64])
def test_trunk_bn_is_off_when_use_bn_false(size: int) -> None:
    enc = small_encoder(size, use_bn=False).eval()
    # Non-zero conv2 so that the BNs inside the residual branches would matter if applied.
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, (ConvResNxN, FakeRKHSConvNet)):
                m.conv2.weight.normal_(0.0, 0.1)
    bns = _maybe_bns(enc)
    assert len(bns) > 0  # the parameters exist ...
    calls = []
    for m in bns:
        m.bn.register_forward_hook(lambda *_: calls.append(1))
    x = images(size)
    with torch.no_grad():
        before = enc(x)
        _scramble_running_stats(bns)
        after = enc(x)
    assert calls == []  # ... but are never applied
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)
    # The Conv3x3 stems have a bias when BN is off.
    assert all(m.conv.bias is not None for m in enc.modules() if isinstance(m, Conv3x3))


def test_trunk_bn_is_applied_when_use_bn_true() -> None:
    enc = small_encoder(32, use_bn=True).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, (ConvResNxN, FakeRKHSConvNet)):
                m.conv2.weight.normal_(0.0, 0.1)
    bns = _maybe_bns(enc)
    called = set()
    for i, m in enumerate(bns):
        m.bn.register_forward_hook(lambda *_, i=i: called.add(i))
    x = images(32)
    with torch.no_grad():
        before = enc(x)
        _scramble_running_stats(bns)
        after = enc(x)
    # Every trunk, branch and head MaybeBN except the (unused) one inside the stem's Conv3x3s ran.
    stem_bns = {
        i for i, m in enumerate(bns) if any(m is c.bn for c in enc.modules() if isinstance(c, Conv3x3))
    }
    assert called == set(range(len(bns))) - stem_bns
    for b, a in zip(before, after):
        assert not torch.allclose(a, b)
    # The stem is built with use_bn=False in every official config, so it keeps its bias.
    assert all(m.conv.bias is not None for m in enc.modules() if isinstance(m, Conv3x3))
    assert Conv3x3(3, 4, 3, 1, 0, use_bn=True).conv.bias is None


def test_output_bns_always_on() -> None:
    enc = small_encoder(32, use_bn=False)
    enc.train()
    with torch.no_grad():
        r1, r5, r7 = enc(images(32, batch=8))
    # Train-mode BN with the default affine init: each channel has zero mean over the batch.
    for r in (r1, r5, r7):
        torch.testing.assert_close(r.mean(dim=(0, 2, 3)), torch.zeros(RKHS), atol=1e-5, rtol=0)


def test_channels_last_input_gives_the_same_outputs() -> None:
    enc = small_encoder(32).eval()
    x = images(32)
    with torch.no_grad():
        want = enc(x)
        got = enc(x.to(memory_format=torch.channels_last))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_receptive_fields_of_taps_at_32px() -> None:
    # spec 2.2: f7 has RF 8 and f5 RF 16 (jump 4); the gradient of one output location must be
    # supported inside that window of the input.
    enc = small_encoder(32).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, ConvResNxN):
                m.conv2.weight.normal_(0.0, 0.1)
    x = images(32, batch=1).requires_grad_(True)
    outs = enc.layer_outputs(x)
    for tap, rf in ((enc.tap_7, 8), (enc.tap_5, 16)):
        (grad,) = torch.autograd.grad(outs[tap][0, :, 0, 0].sum(), x, retain_graph=True)
        support = grad.abs().sum(dim=(0, 1)) > 0
        rows, cols = support.nonzero(as_tuple=True)
        assert rows.max().item() == rf - 1 and cols.max().item() == rf - 1
        assert rows.min().item() == 0 and cols.min().item() == 0


@pytest.mark.parametrize(("size", "mult"), [(32, 4), (64, 8), (128, 8)])
def test_constructor_rejects_small_n_rkhs(size: int, mult: int) -> None:
    Encoder(ModelConfig(image_size=size, ndf=4, n_rkhs=mult * 4, n_depth=1))  # the bound itself is fine
    with pytest.raises(ValueError, match=r"model\.n_rkhs"):
        Encoder(ModelConfig(image_size=size, ndf=4, n_rkhs=mult * 4 - 1, n_depth=1))


@pytest.mark.parametrize("size", [16, 48, 96, 224])
def test_constructor_rejects_unknown_image_size(size: int) -> None:
    with pytest.raises(ValueError, match=r"model\.image_size"):
        Encoder(ModelConfig(image_size=size, ndf=4, n_rkhs=64, n_depth=1))


def test_backward_reaches_every_parameter() -> None:
    enc = small_encoder(32).train()
    # conv1 only gets gradient through a non-zero conv2, so perturb conv2 away from its zero init.
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, (ConvResNxN, FakeRKHSConvNet)):
                m.conv2.weight.normal_(0.0, 0.1)
    r1, r5, r7 = enc(images(32, batch=4))
    (r1.square().sum() + r5.square().sum() + r7.square().sum() + r1.sum() + r5.sum() + r7.sum()).backward()
    unused = {id(m.bn.weight) for m in _maybe_bns(enc)} | {id(m.bn.bias) for m in _maybe_bns(enc)}
    for name, p in enc.named_parameters():
        if id(p) not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
