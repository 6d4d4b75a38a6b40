"""The NCE loss against independent loop references (spec 3.3, 3.4), its knobs, and mixtures (spec 4)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from amdim.config import LossConfig
from amdim.mixture import MixtureHead, mixture_posteriors, save_segmentation_grid, segment
from amdim.nce import mixture_objective, multiscale_nce, nce_log_probs, scores

D = 8
B = 4


def _views(seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)

    def view():
        return tuple(scale * torch.randn(B, D, s, s, generator=g, dtype=dtype) for s in (1, 5, 7))

    return view(), view()


# --- independent loop references -----------------------------------------------------------------


def _ref_log_probs(src, trg, pos_offset, tclip):
    """log_softmax index 0 of [positive] + [every location of every other image], one (i, k, l) at a time."""
    b, k, d = src.shape
    n, _, n_loc = trg.shape

    def s(i, kk, j, loc):
        raw = torch.dot(src[i, kk], trg[j, :, loc]) / math.sqrt(d)
        return raw if tclip is None else tclip * torch.tanh(raw / tclip)

    out = torch.empty(b, k, n_loc, dtype=src.dtype)
    for i in range(b):
        pos = pos_offset + i
        for kk in range(k):
            negs = [s(i, kk, j, l2) for j in range(n) if j != pos for l2 in range(n_loc)]
            for loc in range(n_loc):
                vec = torch.stack([s(i, kk, pos, loc), *negs])
                out[i, kk, loc] = torch.log_softmax(vec, 0)[0]
    return out


def _ref_reg(src, trg):
    d = src.shape[-1]
    vals = [
        (torch.dot(src[i, kk], trg[j, :, loc]) / math.sqrt(d)) ** 2
        for i in range(src.shape[0])
        for kk in range(src.shape[1])
        for j in range(trg.shape[0])
        for loc in range(trg.shape[2])
    ]
    return torch.stack(vals).mean()


def _ref_multiscale(a, b, cfg, loc_a, loc_b):
    """spec 3.4 from the reference pieces, with given 5x5 source locations (flat row*5+col)."""

    def src_of(view, pair, loc):
        if pair[0] == "1":
            return view[0].flatten(1).unsqueeze(1)
        return torch.stack([view[1][i, :, int(loc[i]) // 5, int(loc[i]) % 5] for i in range(B)]).unsqueeze(1)

    def trg_of(view, pair):
        return (view[1] if pair[2] == "5" else view[2]).flatten(2)

    out, reg = {}, 0.0
    for pair in cfg.pairs:
        d1_src, d1_trg = src_of(a, pair, loc_a), trg_of(b, pair)
        d2_src, d2_trg = src_of(b, pair, loc_b), trg_of(a, pair)
        d1 = -_ref_log_probs(d1_src, d1_trg, 0, cfg.tclip).mean()
        d2 = -_ref_log_probs(d2_src, d2_trg, 0, cfg.tclip).mean()
        out[f"g2l_{pair}"] = 0.5 * (d1 + d2)
        reg = reg + 0.5 * (_ref_reg(d1_src, d1_trg) + _ref_reg(d2_src, d2_trg))
    out["reg"] = cfg.reg_weight * reg
    out["loss"] = sum(out[f"g2l_{p}"] for p in cfg.pairs) + out["reg"]
    return out


# --- (a) equality with the references -------------------------------------------------------------


@pytest.mark.parametrize("tclip", [None, 1.5])
@pytest.mark.parametrize(("k", "n", "offset"), [(1, B, 0), (2, 6, 2)])
def test_log_probs_match_loop_reference(tclip, k, n, offset):
    g = torch.Generator().manual_seed(1)
    src = 3 * torch.randn(B, k, D, generator=g, dtype=torch.float64)
    trg = 3 * torch.randn(n, D, 4, generator=g, dtype=torch.float64)
    log_probs, reg = nce_log_probs(src, trg, offset, tclip)
    assert log_probs.shape == (B, k, 4)
    # the score maths is fp32 by design, so compare at fp32 precision
    torch.testing.assert_close(
        log_probs.double(), _ref_log_probs(src, trg, offset, tclip), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(reg.double(), _ref_reg(src, trg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tclip", [None, 2.0])
def test_multiscale_matches_loop_reference(tclip):
    a, b = _views()
    cfg = LossConfig(tclip=tclip, reg_weight=0.05)
    got = multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # documented draw order: a->b, then b->a, over N = B images
    loc_a = torch.randint(0, 25, (B,), generator=g)
    loc_b = torch.randint(0, 25, (B,), generator=g)
    ref = _ref_multiscale(a, b, cfg, loc_a, loc_b)
    assert set(got) == {"loss", "reg", "g2l_1t5", "g2l_1t7", "g2l_5t5"}
    for key, value in ref.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-5, msg=key)


def test_loss_is_differentiable_and_accepts_mapping():
    a, b = _views(dtype=torch.float32)
    a = tuple(t.requires_grad_() for t in a)
    out = multiscale_nce(dict(zip(("r1", "r5", "r7"), a)), b, LossConfig())
    out["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in a)


# --- (b) every knob reaches the maths -------------------------------------------------------------


def _loss(cfg, seed=0, **kw):
    a, b = _views(seed)
    return multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(3), **kw)


def test_reg_weight_reaches_loss():
    base = _loss(LossConfig(reg_weight=0.05))
    heavier = _loss(LossConfig(reg_weight=0.5))
    off = _loss(LossConfig(reg_weight=0.0))
    assert heavier["loss"] > base["loss"] > off["loss"]
    assert off["reg"] == 0
    torch.testing.assert_close(heavier["reg"], 10 * base["reg"])


def test_tclip_reaches_loss():
    on = _loss(LossConfig(tclip=1.0))["loss"]
    off = _loss(LossConfig(tclip=None))["loss"]
    assert not torch.isclose(on, off)


def test_pairs_reach_loss():
    full = _loss(LossConfig())
    fewer = _loss(LossConfig(pairs=("1t5", "5t5")))
    assert "g2l_1t7" not in fewer and "g2l_1t7" in full
    torch.testing.assert_close(fewer["loss"], full["loss"] - full["g2l_1t7"] - 0.05 * _reg_of(full, "1t7"))


def _reg_of(full, pair):
    only = _loss(LossConfig(pairs=(pair,), reg_weight=1.0))
    return only["reg"]


# --- (c) fp32 under autocast ----------------------------------------------------------------------


def test_scores_are_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(B, 1, 64, generator=g)
    trg = torch.randn(B, 64, 25, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(src, trg[0]).dtype == torch.bfloat16  # autocast would apply here
        lp_fp32_inputs, reg = nce_log_probs(src, trg, 0, 20.0)
        lp_bf16_inputs, _ = nce_log_probs(src.bfloat16(), trg.bfloat16(), 0, 20.0)
    assert lp_fp32_inputs.dtype == reg.dtype == lp_bf16_inputs.dtype == torch.float32
    assert torch.equal(lp_fp32_inputs, nce_log_probs(src, trg, 0, 20.0)[0])
    ref_bf16, _ = nce_log_probs(src.bfloat16().float(), trg.bfloat16().float(), 0, 20.0)
    assert torch.equal(lp_bf16_inputs, ref_bf16)


def test_multiscale_loss_is_fp32_under_bf16_autocast():
    a, b = _views(dtype=torch.float32)
    a16 = tuple(t.bfloat16() for t in a)
    b16 = tuple(t.bfloat16() for t in b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multiscale_nce(a16, b16, LossConfig(), generator=torch.Generator().manual_seed(0))
    ref = multiscale_nce(
        tuple(t.float() for t in a16),
        tuple(t.float() for t in b16),
        LossConfig(),
        generator=torch.Generator().manual_seed(0),
    )
    assert all(v.dtype == torch.float32 for v in out.values())
    assert torch.equal(out["loss"], ref["loss"])


# --- (d) score scale --------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 16, 64])
def test_score_scale_is_one_over_sqrt_d(d):
    src = torch.ones(1, 1, d)
    trg = torch.ones(2, d, 3)
    torch.testing.assert_close(scores(src, trg), torch.full((1, 1, 2, 3), d / math.sqrt(d)))
    _, reg = nce_log_probs(src, trg, 0, None)
    torch.testing.assert_close(reg, torch.tensor(float(d)))  # mean of (sqrt(d))**2


# --- (e) mixtures ------------------------------------------------------------------------------------


def _mix_inputs(k, seed=0):
    a, b = _views(seed)
    g = torch.Generator().manual_seed(seed + 100)
    mix_a = a[0].flatten(1).unsqueeze(1) + torch.randn(B, k, D, generator=g, dtype=torch.float64)
    mix_b = b[0].flatten(1).unsqueeze(1) + torch.randn(B, k, D, generator=g, dtype=torch.float64)
    return a, b, mix_a, mix_b


def test_single_component_is_exactly_the_plain_loss():
    a, b = _views()
    cfg = LossConfig(mix_pairs=("1t5", "1t7"))
    plain = multiscale_nce(a, b, cfg, generator=torch.Generator().manual_seed(0))
    mixed = multiscale_nce(
        a,
        b,
        cfg,
        mix_a=a[0].flatten(1).unsqueeze(1),
        mix_b=b[0].flatten(1).unsqueeze(1),
        generator=torch.Generator().manual_seed(0),
    )
    for key in plain:
        assert torch.equal(plain[key], mixed[key]), key
    assert mixed["mix_entropy"] == 0
    lp = torch.randn(3, 1, 7)
    objective, entropy = mixture_objective(lp, alpha=0.3)
    assert torch.equal(objective, lp[:, 0]) and torch.all(entropy == 0)


def test_alpha_and_tau_are_equivalent_and_alpha_matters():
    a, b, mix_a, mix_b = _mix_inputs(3)
    cfg = LossConfig(n_mix=3, mix_alpha=0.5)
    by_alpha = multiscale_nce(a, b, cfg, mix_a=mix_a, mix_b=mix_b, generator=torch.Generator().manual_seed(0))
    by_tau = multiscale_nce(
        a,
        b,
        replace(cfg, mix_alpha=None, mix_tau=2.0),
        mix_a=mix_a,
        mix_b=mix_b,
        generator=torch.Generator().manual_seed(0),
    )
    other = multiscale_nce(
        a,
        b,
        replace(cfg, mix_alpha=2.0),
        mix_a=mix_a,
        mix_b=mix_b,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(by_alpha["loss"], by_tau["loss"])
    assert not torch.isclose(by_alpha["loss"], other["loss"])
    assert 0 < by_alpha["mix_entropy"] <= math.log(3)


def test_n_mix_and_mix_pairs_reach_loss():
    a, b, mix_a, mix_b = _mix_inputs(2)
    cfg = LossConfig(n_mix=2, mix_pairs=("1t7",))
    with pytest.raises(ValueError, match="n_mix"):
        multiscale_nce(a, b, cfg)
    with pytest.raises(ValueError, match="mix_a"):
        multiscale_nce(a, b, replace(cfg, n_mix=3), mix_a=mix_a, mix_b=mix_b)
    plain = multiscale_nce(a, b, LossConfig(), generator=torch.Generator().manual_seed(0))
    only_1t7 = multiscale_nce(a, b, cfg, mix_a=mix_a, mix_b=mix_b, generator=torch.Generator().manual_seed(0))
    both = multiscale_nce(
        a,
        b,
        replace(cfg, mix_pairs=("1t5", "1t7")),
        mix_a=mix_a,
        mix_b=mix_b,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(only_1t7["g2l_1t5"], plain["g2l_1t5"])
    assert not torch.isclose(only_1t7["g2l_1t7"], plain["g2l_1t7"])
    assert not torch.isclose(both["g2l_1t5"], plain["g2l_1t5"])
    assert torch.equal(both["g2l_5t5"], plain["g2l_5t5"])


def test_mixture_gradient_reaches_every_component_and_obeys_the_envelope():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(B, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = 0.7
    objective, _ = mixture_objective(lp, alpha)
    (grad,) = torch.autograd.grad(objective.sum(), lp)
    closed = alpha * torch.logsumexp(lp / alpha, dim=1)  # max over q of E_q[nce] + alpha H(q)
    (grad_closed,) = torch.autograd.grad(closed.sum(), lp)
    torch.testing.assert_close(objective, closed)
    torch.testing.assert_close(grad, grad_closed)
    assert not mixture_objective(lp, alpha)[1].requires_grad  # H(q) is a detached diagnostic

    a, b, mix_a, mix_b = _mix_inputs(3)
    mix_a.requires_grad_()
    out = multiscale_nce(a, b, LossConfig(n_mix=3), mix_a=mix_a, mix_b=mix_b)
    out["loss"].backward()
    assert torch.all(mix_a.grad.abs().sum(dim=(0, 2)) > 0)


def test_mixture_head_shapes_and_distinct_components():
    torch.manual_seed(0)
    head = MixtureHead.from_config(LossConfig(n_mix=3, mix_hidden=0), n_rkhs=D)
    assert head.hidden.out_features == D
    assert MixtureHead(D, 3, hidden=5).hidden.out_features == 5
    f1 = torch.randn(B, D, 1, 1)
    comps = head(f1)
    assert comps.shape == (B, 3, D)
    assert not torch.allclose(comps[:, 0], comps[:, 1])
    with pytest.raises(ValueError, match="n_mix"):
        MixtureHead(D, 0)


def _toy_segmentation():
    """Components pointing at e0 and e1; image 0 is e0 on the left / e1 on the right, image 1 top / bottom."""
    d, c = 4, 10.0
    head = MixtureHead(d, 2)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
        head.out.bias[0] = c  # component 0 = c * e0 (input is zero)
        head.out.bias[d + 1] = c  # component 1 = c * e1
    r7 = torch.zeros(2, d, 7, 7)
    r7[0, 0, :, :3] = 1.0
    r7[0, 1, :, 3:] = 1.0
    r7[1, 0, :3, :] = 1.0
    r7[1, 1, 3:, :] = 1.0
    expected = torch.zeros(2, 7, 7, dtype=torch.long)
    expected[0, :, 3:] = 1
    expected[1, 3:, :] = 1
    return head, torch.zeros(2, d, 1, 1), r7, expected


def test_segment_assigns_regions_to_matching_components():
    head, r1, r7, expected = _toy_segmentation()
    seg = segment(r1, r7, head, alpha=1.0, tclip=20.0)
    assert seg.shape == (2, 7, 7) and seg.dtype == torch.long
    assert torch.equal(seg, expected)
    q = mixture_posteriors(r1, r7, head, alpha=1.0)
    assert q.shape == (2, 2, 7, 7)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 7, 7))


def test_save_segmentation_grid_writes_png(tmp_path):
    _, _, _, expected = _toy_segmentation()
    images = torch.rand(2, 3, 28, 28)
    path = save_segmentation_grid(images, expected, tmp_path / "seg" / "grid.png", k=2)
    with Image.open(path) as img:
        assert img.size == (4 * 28 + 5 * 2, 28 + 2 * 2)  # one row: image, map, image, map
    save_segmentation_grid((images * 255).to(torch.uint8), expected, tmp_path / "u8.png", k=2)
    with pytest.raises(ValueError, match="assignments"):
        save_segmentation_grid(images, expected + 5, tmp_path / "bad.png", k=2)
