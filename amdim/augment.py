"""Two-view training augmentation and the test transform (spec sections 5.1-5.3).

One semantics, two implementations, both parameterised only by an :class:`AugConfig`, the output
size and the normalisation mean/std:

* :class:`TorchvisionTwoViews` works on one image at a time (DataLoader workers). It draws with
  torchvision's own samplers and applies ``torchvision.transforms.v2.functional``: it is the
  reference.
* :class:`BatchedTwoViews` works on a uint8 batch on any device. Every per-sample parameter is
  drawn vectorised and applied without a Python loop over the batch.

Per image (spec 5.1): one horizontal flip (``flip_p``) shared by both views; then, independently
per view (spec 5.2):

1. geometric: ``RandomResizedCrop(out, scale, ratio, bicubic)`` when ``cfg.crop``, else
   ``RandomApply(translate, p=translate_p)`` by integer ``dx, dy ~ U{-t..t}`` with reflect
   padding that does not repeat the edge pixel (``F.pad(mode="reflect")``), content moving by
   ``+dx`` right and ``+dy`` down;
2. ``RandomApply(ColorJitter(b, c, s, h), p=jitter_p)``: factors ``b, c, s ~ U[max(0, 1-x), 1+x]``,
   hue ``~ U[-h, h]``, the four ops in a uniformly random order; a component whose range is 0 is
   skipped, as torchvision does;
3. ``RandomGrayscale(gray_p)``; 4. ``Normalize(mean, std)``.

The batched crop is not ``grid_sample``: it resamples with per-sample separable weight
matrices that reproduce torch's antialiased bicubic resize (two batched matmuls), so batched and
reference crops agree to ~1e-5 even when the crop is downscaled, where ``grid_sample`` would alias.

Both paths work in float32 in [0, 1] from the start (the official PIL pipeline quantises to uint8
after every op; this is a sub-1/255 difference) and clamp to [0, 1] after each resize, as uint8 did.

Parameters are plain dicts, the same keys in both paths (python scalars per image, tensors with a
leading batch dim when batched)::

    {"flip": bool, "views": (view1, view2)}
    view = {"crop": (i, j, h, w), "translate": (dx, dy), "jitter": bool,
            "order": (op, op, op, op), "factors": (b, c, s, h), "gray": bool}

``order`` lists op ids (0 brightness, 1 contrast, 2 saturation, 3 hue) in application order.
``crop`` is the whole input when ``cfg.crop`` is off; ``translate`` is (0, 0) when not applied or
in crop mode. :func:`param_at` and :func:`stack_params` convert between the two layouts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from amdim import speed
from amdim.config import AugConfig

OPS = ("brightness", "contrast", "saturation", "hue")
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision / ITU-R 601-2 luma
Params = dict[str, Any]


@functools.lru_cache(maxsize=1)
def _tv() -> tuple[Any, Any, Any]:
    """torchvision's ``transforms``, its v2 ``functional`` and bicubic interpolation, imported on
    first use. Importing torchvision costs about 1.5 s on a 2-core CPU (it imports
    ``torch._dynamo``), and the batched default path at the dataset's own size never needs it:
    every new study trial and every ``amdim`` command would pay for it otherwise."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional

    return transforms, functional, InterpolationMode.BICUBIC


_CONSTANTS: dict[tuple[tuple[float, ...], torch.device, torch.dtype], Tensor] = {}


def constant(
    values: Sequence[float], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A small 1-D tensor of ``values`` on ``device``, made once per (values, device, dtype).

    Building a tensor from Python values on a GPU is a blocking host-to-device copy: the CPU
    waits for the GPU to drain before it queues the next kernel. The augmentation's constants
    (normalisation, jitter ranges, the HSV sectors) are therefore made once and reused, so that a
    training step queues its kernels without waiting (tests/test_host_syncs.py)."""
    key = (tuple(float(v) for v in values), torch.device(device), dtype)
    found = _CONSTANTS.get(key)
    if found is None:
        found = _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=key[1])
    return found


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of (..., 3, H, W), as torchvision's ``normalize``
    computes it (same dtype and device, subtract then divide)."""
    m = constant(mean, x.device, x.dtype).view(-1, 1, 1)
    s = constant(std, x.device, x.dtype).view(-1, 1, 1)
    return x.sub(m).div_(s)


def _to_float(img: Tensor) -> Tensor:
    """uint8 (or float in [0, 1]) image(s) -> float32 in [0, 1]."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).div_(255.0)
    if not img.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {img.dtype}")
    return img.to(torch.float32)


def _resize_exact(x: Tensor, size: int) -> Tensor:
    """Bicubic, antialiased resize of (..., 3, H, W) to (size, size), clamped to [0, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    _, F, BICUBIC = _tv()
    return F.resize(x, [size, size], interpolation=BICUBIC, antialias=True).clamp_(0.0, 1.0)


def test_transform(
    img: Tensor, cfg: AugConfig, out_size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """Deterministic test transform (spec 5.3) for one image or a batch, on any device.

    ``cfg.test_resize > 0``: resize the shorter side to ``test_resize`` (bicubic), centre-crop
    ``out_size``. Otherwise resize to ``out_size`` only if the size differs. Then normalise.

    Args:
        img: uint8 (3, H, W) or (B, 3, H, W) (float in [0, 1] also accepted).

    Returns:
        float32 (3, out, out) or (B, 3, out, out).
    """
    x = _to_float(img)
    if cfg.test_resize > 0:
        _, F, BICUBIC = _tv()
        x = F.resize(x, [cfg.test_resize], interpolation=BICUBIC, antialias=True).clamp_(0.0, 1.0)
        x = F.center_crop(x, [out_size, out_size])
    else:
        x = _resize_exact(x, out_size)
    return _normalize(x, mean, std)


test_transform.__test__ = False  # a pytest module that imports it must not collect it as a test


class _TwoViews:
    """What both implementations share: the validated knobs and the test transform."""

    def __init__(self, cfg: AugConfig, out_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each with std > 0, got {mean}, {std}")
        if not cfg.crop and cfg.translate_px >= out_size:
            raise ValueError(f"translate_px ({cfg.translate_px}) must be < out_size ({out_size})")
        self.cfg = cfg
        self.out_size = out_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        jit = cfg.jitter()
        self.jitter_ranges = (
            (max(0.0, 1 - jit[0]), 1 + jit[0]),
            (max(0.0, 1 - jit[1]), 1 + jit[1]),
            (max(0.0, 1 - jit[2]), 1 + jit[2]),
            (-jit[3], jit[3]),
        )
        # torchvision's ColorJitter turns a component off when its range is a point at identity.
        self.enabled = tuple(jit[k] > 0 for k in range(4))

    def test_transform(self, img: Tensor) -> Tensor:
        """:func:`test_transform` with this object's config, size and normalisation."""
        return test_transform(img, self.cfg, self.out_size, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_size={self.out_size}, cfg={self.cfg})"


# --- per-image reference path ---------------------------------------------------------------


class TorchvisionTwoViews(_TwoViews):
    """Per-image two views with torchvision's samplers and functional ops (the reference).

    Draws from the global torch RNG, as torchvision does; seed it (e.g. per sample in the
    DataLoader worker) for reproducibility.

    Call on a uint8 (3, H, W) tensor; returns ``(view1, view2)``, float32 (3, out, out).
    """

    def __init__(self, cfg: AugConfig, out_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(cfg, out_size, mean, std)
        T, F, _ = _tv()
        b, c, s, h = cfg.jitter()
        self._jitter = T.ColorJitter(b, c, s, h)  # only for its normalised ranges and get_params
        self._ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)

    def __call__(self, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(img, self.sample_params(img))

    def sample_params(self, img: Tensor) -> Params:
        """Draw the flip and both views' parameters for ``img`` (3, H, W)."""
        height, width = img.shape[-2:]
        flip = bool(torch.rand(1).item() < self.cfg.flip_p)
        return {"flip": flip, "views": tuple(self._sample_view(img, height, width) for _ in range(2))}

    def _sample_view(self, img: Tensor, height: int, width: int) -> Params:
        cfg = self.cfg
        crop, translate = (0, 0, height, width), (0, 0)
        T, _, _ = _tv()
        if cfg.crop:
            scale = [cfg.crop_scale_min, cfg.crop_scale_max]
            ratio = [cfg.crop_ratio_min, cfg.crop_ratio_max]
            crop = tuple(int(v) for v in T.RandomResizedCrop.get_params(img, scale, ratio))
        elif torch.rand(1).item() < cfg.translate_p:
            t = cfg.translate_px
            translate = tuple(int(v) for v in torch.randint(-t, t + 1, (2,)))
        jitter = bool(torch.rand(1).item() < cfg.jitter_p)
        j = self._jitter
        order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        identity = (1.0, 1.0, 1.0, 0.0)
        factors = tuple(identity[k] if f is None else float(f) for k, f in enumerate(factors))
        gray = bool(torch.rand(1).item() < cfg.gray_p)
        return {
            "crop": crop,
            "translate": translate,
            "jitter": jitter,
            "order": tuple(int(o) for o in order),
            "factors": factors,
            "gray": gray,
        }

    def apply(self, img: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """Both views of ``img`` (uint8 (3, H, W)) under ``params`` from :meth:`sample_params`."""
        x = _to_float(img)
        if params["flip"]:
            x = _tv()[1].horizontal_flip(x)
        v1, v2 = (self._view(x, p) for p in params["views"])
        return v1, v2

    def _view(self, x: Tensor, p: Params) -> Tensor:
        out = self.out_size
        _, F, BICUBIC = _tv()
        if self.cfg.crop:
            i, j, h, w = p["crop"]
            x = F.resized_crop(x, i, j, h, w, [out, out], interpolation=BICUBIC, antialias=True)
            x = x.clamp(0.0, 1.0)
        else:
            x = _resize_exact(x, out)
            dx, dy = p["translate"]
            if dx or dy:
                t = self.cfg.translate_px
                x = F.crop(F.pad(x, [t, t, t, t], padding_mode="reflect"), t - dy, t - dx, out, out)
        if p["jitter"]:
            for op in p["order"]:
                if self.enabled[op]:
                    x = self._ops[op](x, p["factors"][op])
        if p["gray"]:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        return F.normalize(x.contiguous(), list(self.mean), list(self.std))


# --- batched on-device path -----------------------------------------------------------------


def _resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per-sample 1-D resampling matrices for "crop [start, start+length) then resize to out".

    Reproduces torch's antialiased bicubic interpolation (``interpolate(antialias=True)``, what
    torchvision's tensor ``resize`` uses): Keys cubic kernel with a = -0.5, support
    ``2 * max(scale, 1)``, kernel stretched by ``scale`` when downsampling, taps restricted to the
    crop and renormalised at its edges.

    Args:
        start, length: (B,) integer crop offset and length along this axis.

    Returns:
        (B, out_size, in_size) float32 weights, zero outside each crop; rows sum to 1.
    """
    a = -0.5
    dev = start.device
    scale = length.float() / out_size  # (B,)
    invscale = (1.0 / scale.clamp(min=1.0))[:, None, None]
    centre = scale[:, None] * (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5)  # (B, out)
    pos = torch.arange(in_size, device=dev, dtype=torch.float32) - start.float()[:, None]  # (B, in)
    # Pixels outside the crop get a far-away position, hence zero weight. Inside it, torch's tap
    # window [trunc(c - support + 0.5), trunc(c + support + 0.5)) is exactly |t| < 2 below.
    pos = torch.where((pos >= 0) & (pos < length[:, None]), pos, 1e6)
    t = ((pos[:, None, :] - centre[..., None] + 0.5) * invscale).abs_()  # (B, out, in)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    w = torch.where(t < 1, near, far.mul_(t < 2))
    return w / w.sum(-1, keepdim=True)


def _resized_crop(x: Tensor, boxes: Tensor, out_size: int) -> Tensor:
    """Crop ``boxes`` (B, 4) = (i, j, h, w) from x (B, C, H, W) and resize each to out x out.

    Separable resampling as two batched matmuls with per-sample weight matrices, so the result
    matches torchvision's antialiased bicubic ``resized_crop`` (not only on upscaling crops).
    """
    _, _, height, width = x.shape
    wy = _resample_weights(boxes[:, 0], boxes[:, 2], height, out_size)  # (B, out, H)
    wx = _resample_weights(boxes[:, 1], boxes[:, 3], width, out_size)  # (B, out, W)
    return torch.einsum("buh,bchw,bvw->bcuv", wy, x, wx).clamp_(0.0, 1.0)  # (B, C, out, out)


def _translate(x: Tensor, shift: Tensor, pad: int) -> Tensor:
    """out[b, :, y, x] = reflect(x[b])[y - dy, x - dx] for shift (B, 2) = (dx, dy), |d| <= pad."""
    if pad == 0:
        return x
    b, c, height, width = x.shape
    padded = nnf.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    rows = (pad - shift[:, 1])[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = (pad - shift[:, 0])[:, None] + torch.arange(width, device=x.device)  # (B, W)
    idx = rows[:, None, :, None].expand(b, c, height, padded.shape[-1])
    padded = padded.gather(2, idx)
    return padded.gather(3, cols[:, None, None, :].expand(b, c, height, width))


def _gray(x: Tensor) -> Tensor:
    """Luma of (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2])[:, None]


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1]; ratio (B,) per sample."""
    r = ratio[:, None, None, None]
    return (x * r + other * (1.0 - r)).clamp_(0.0, 1.0)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f[:, None, None, None]).clamp_(0.0, 1.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with every channel in [0, 1] (hue in turns)."""
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    sat = delta / torch.where(value > 0, value, 1.0)
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels: r = g = b, so hue comes out 0 below
    hue = torch.where(value == r, (g - b) / d, torch.where(value == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return torch.stack((torch.remainder(hue / 6.0, 1.0), sat, value), 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    hue, sat, value = (t[:, None] for t in x.unbind(1))
    n = constant((5.0, 3.0, 1.0), x.device, x.dtype)[None, :, None, None]
    k = torch.remainder(n + 6.0 * hue, 6.0)
    return value - value * sat * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (B,) turns."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), 1))


_JITTER_OPS = (_brightness, _contrast, _saturation, _adjust_hue)  # in torchvision's op-id order


def _apply_where(x: Tensor, sel: Tensor, op: Any, factor: Tensor) -> Tensor:
    """``op(x, factor)`` on the selected samples, ``x`` elsewhere.

    On CPU the op runs on the selected samples alone (each sample then pays for one op per jitter
    position rather than four); on an accelerator it runs on all and selects, avoiding a host sync
    (picking the samples needs their count on the host).
    """
    if speed.host_syncs_are_free(x.device):
        idx = sel.nonzero()[:, 0]
        return x.index_copy(0, idx, op(x[idx], factor[idx])) if idx.numel() else x
    return torch.where(sel[:, None, None, None], op(x, factor), x)


class BatchedTwoViews(_TwoViews):
    """Vectorised two views for a uint8 batch on its own device (CPU or CUDA).

    Crops resample with per-sample antialiased bicubic weight matrices (two batched matmuls; see
    :func:`_resized_crop`); translations gather from a reflect-padded batch; jitter visits the
    4 positions x 4 ops and applies each op to the samples that drew it there, so the only loop
    is over those 16 slots.

    Call on uint8 (B, 3, H, W); returns ``(x1, x2)``, float32 (B, 3, out, out) on x's device.
    """

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        b, _, height, width = x.shape
        return self.apply(x, self.sample_params(b, height, width, x.device, generator))

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Params:
        """Per-sample parameters, drawn on ``device`` from ``generator`` (global RNG if None)."""
        dev = torch.device("cpu") if device is None else torch.device(device)
        flip = self._rand(generator, dev, batch) < self.cfg.flip_p
        views = tuple(self._sample_view(batch, height, width, dev, generator) for _ in range(2))
        return {"flip": flip, "views": views}

    @staticmethod
    def _rand(gen: torch.Generator | None, dev: torch.device, *shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, device=dev)

    def _sample_view(
        self, batch: int, height: int, width: int, dev: torch.device, gen: torch.Generator | None
    ) -> Params:
        cfg = self.cfg
        translate = torch.zeros(batch, 2, dtype=torch.long, device=dev)
        if cfg.crop:
            crop = self._sample_crops(batch, height, width, dev, gen)
        else:
            crop = torch.zeros(batch, 4, dtype=torch.long, device=dev)  # the whole image
            crop[:, 2].fill_(height)
            crop[:, 3].fill_(width)
            applied = self._rand(gen, dev, batch) < cfg.translate_p
            t = cfg.translate_px
            shift = torch.randint(-t, t + 1, (batch, 2), generator=gen, device=dev)
            translate = shift * applied[:, None]
        return {"crop": crop, "translate": translate, **self._sample_colour(batch, dev, gen)}

    def _sample_colour(self, batch: int, dev: torch.device, gen: torch.Generator | None) -> Params:
        jitter = self._rand(gen, dev, batch) < self.cfg.jitter_p
        order = self._rand(gen, dev, batch, 4).argsort(1)  # a uniform random permutation per row
        lo = constant([r[0] for r in self.jitter_ranges], dev)
        hi = constant([r[1] for r in self.jitter_ranges], dev)
        factors = lo + (hi - lo) * self._rand(gen, dev, batch, 4)
        gray = self._rand(gen, dev, batch) < self.cfg.gray_p
        return {"jitter": jitter, "order": order, "factors": factors, "gray": gray}

    def colour(
        self, v1: Tensor, v2: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Steps 2-4 alone (jitter, grayscale, normalise), independently per view, for views whose
        flip and crop were made already (uint8 (B, 3, out, out) each: photos from an image folder,
        cropped in the loader workers, see :class:`amdim.data.PhotoCrops`)."""
        with torch.autocast(v1.device.type, enabled=False):
            out = [
                self._colour(_to_float(v), self._sample_colour(v.shape[0], v.device, generator))
                for v in (v1, v2)
            ]
        return out[0], out[1]

    def _sample_crops(
        self, batch: int, height: int, width: int, dev: torch.device, gen: torch.Generator | None
    ) -> Tensor:
        """RandomResizedCrop.get_params for a batch: 10 tries each, first valid wins, else centre."""
        cfg = self.cfg
        area = float(height * width)
        scale = cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min) * self._rand(
            gen, dev, batch, 10
        )
        log_lo, log_hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
        ratio = torch.exp(log_lo + (log_hi - log_lo) * self._rand(gen, dev, batch, 10)).double()
        target = area * scale.double()
        w = torch.round(torch.sqrt(target * ratio)).long()  # round half to even, as Python's round
        h = torch.round(torch.sqrt(target / ratio)).long()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first valid try
        found = ok.any(1)
        fh, fw = _centre_fallback(height, width, cfg.crop_ratio_min, cfg.crop_ratio_max)
        h = torch.where(found, h.gather(1, first)[:, 0], torch.full_like(found, fh, dtype=torch.long))
        w = torch.where(found, w.gather(1, first)[:, 0], torch.full_like(found, fw, dtype=torch.long))
        u = torch.rand(batch, 2, generator=gen, device=dev, dtype=torch.float64)
        i_rand = torch.minimum((u[:, 0] * (height - h + 1)).long(), height - h)
        j_rand = torch.minimum((u[:, 1] * (width - w + 1)).long(), width - w)
        i = torch.where(found, i_rand, (height - h) // 2)
        j = torch.where(found, j_rand, (width - w) // 2)
        return torch.stack((i, j, h, w), 1)

    def apply(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """Both views of the batch ``x`` (uint8 (B, 3, H, W)) under batched ``params``."""
        # Full fp32 even when called inside an autocast region: the crop is a matmul.
        with torch.autocast(x.device.type, enabled=False):
            x = _to_float(x)
            x = torch.where(params["flip"][:, None, None, None], x.flip(-1), x)
            v1, v2 = (self._view(x, p) for p in params["views"])
        return v1, v2

    def _view(self, x: Tensor, p: Params) -> Tensor:
        out = self.out_size
        if self.cfg.crop:
            x = _resized_crop(x, p["crop"], out)
        else:
            x = _translate(_resize_exact(x, out), p["translate"], self.cfg.translate_px)
        return self._colour(x, p)

    def _colour(self, x: Tensor, p: Params) -> Tensor:
        """Steps 2-4 on float views in [0, 1]: jitter, grayscale, normalise."""
        x = self._jitter(x, p)
        x = torch.where(p["gray"][:, None, None, None], _gray(x).expand_as(x), x)
        return _normalize(x, self.mean, self.std)

    def _jitter(self, x: Tensor, p: Params) -> Tensor:
        """Per-sample colour jitter: at each of the 4 positions, every sample gets the op it drew."""
        for position in range(4):
            for op in range(4):
                if self.enabled[op]:
                    sel = p["jitter"] & (p["order"][:, position] == op)
                    x = _apply_where(x, sel, _JITTER_OPS[op], p["factors"][:, op])
        return x


def _centre_fallback(height: int, width: int, ratio_min: float, ratio_max: float) -> tuple[int, int]:
    """RandomResizedCrop's fallback crop size (h, w) after 10 failed tries."""
    in_ratio = width / height
    if in_ratio < ratio_min:
        return round(width / ratio_min), width
    if in_ratio > ratio_max:
        return height, round(height * ratio_max)
    return height, width


# --- parameter layouts and the factory --------------------------------------------------------


def param_at(params: Params, index: int) -> Params:
    """The per-image parameters of sample ``index`` of batched ``params`` (python scalars)."""

    def one(value: Tensor) -> Any:
        v = value[index]
        return bool(v) if v.dtype == torch.bool else tuple(v.tolist()) if v.ndim else v.item()

    views = tuple({k: one(v) for k, v in view.items()} for view in params["views"])
    return {"flip": bool(params["flip"][index]), "views": views}


def stack_params(items: Sequence[Params], device: torch.device | str | None = None) -> Params:
    """Batched parameters from a list of per-image ones (the inverse of :func:`param_at`)."""

    def col(values: list[Any]) -> Tensor:
        first = values[0]
        if isinstance(first, bool):
            return torch.tensor(values, dtype=torch.bool, device=device)
        is_float = isinstance(first[0] if isinstance(first, tuple) else first, float)
        return torch.tensor(values, dtype=torch.float32 if is_float else torch.long, device=device)

    views = tuple(
        {k: col([it["views"][v][k] for it in items]) for k in items[0]["views"][v]} for v in range(2)
    )
    return {"flip": col([it["flip"] for it in items]), "views": views}


def build_two_views(
    cfg: AugConfig, out_size: int, mean: Sequence[float], std: Sequence[float]
) -> BatchedTwoViews | TorchvisionTwoViews:
    """The two-view augmentation ``cfg.impl`` names ("batched" or "torchvision")."""
    if cfg.impl == "batched":
        return BatchedTwoViews(cfg, out_size, mean, std)
    if cfg.impl == "torchvision":
        return TorchvisionTwoViews(cfg, out_size, mean, std)
    raise ValueError(f"aug.impl: must be batched or torchvision, got '{cfg.impl}'")


__all__ = [
    "OPS",
    "BatchedTwoViews",
    "TorchvisionTwoViews",
    "build_two_views",
    "constant",
    "hsv_to_rgb",
    "param_at",
    "rgb_to_hsv",
    "stack_params",
    "test_transform",
]
