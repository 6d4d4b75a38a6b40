"""The AMDIM encoder: a linear residual trunk with three feature taps and two 1x1 embedding heads.

Everything here follows spec section 2. The trunk (``Encoder.layers``) maps an image to a global
``n_rkhs``-vector; along the way two intermediate maps are tapped, the 7x7 map after the third
stride-2 block and the 5x5 map after the first 3x3 block, and each is embedded to ``n_rkhs``
channels by a :class:`FakeRKHSConvNet`. The three outputs ``(r1, r5, r7)`` are what the NCE loss
(spec section 3) compares across views.

Two properties of the official model are kept on purpose (spec section 11, notes 6 and 7):

* the residual units have no ReLU on their input or output, only inside the bottleneck branch;
* the second conv of every residual branch starts at zero, so a new encoder is a stack of
  (channel-padded) average pools on top of the stem.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amdim.config import ModelConfig
from amdim.errors import ConfigError

ENCODER_SIZES = (32, 64, 128)
"""Input sizes with a layer table (spec section 2.2)."""


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on ``meta`` tensors too)."""
    return sum(p.numel() for p in module.parameters())


class MaybeBatchNorm2d(nn.Module):
    """A ``BatchNorm2d`` that is applied only when ``use_bn`` is true (spec section 2.1).

    The BN module and its parameters exist either way, as in the official code, so parameter
    counts and checkpoints do not depend on ``use_bn``.

    Args:
        n_ftr: number of channels C.
        affine: whether the BN has a learnable scale and shift.
        use_bn: apply the BN in :meth:`forward`; otherwise the module is the identity.
    """

    def __init__(self, n_ftr: int, affine: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n_ftr, affine=affine)
        self.use_bn = use_bn
        # A switched-off BN's parameters never get a gradient; freezing them keeps DDP from
        # waiting for gradients that never come, and keeps the optimiser from touching them.
        self.bn.requires_grad_(use_bn)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return self.bn(x) if self.use_bn else x


class Conv3x3(nn.Module):
    """Stem layer: optional explicit padding, conv, optional BN, ReLU (spec section 2.1).

    Despite the (official) name the kernel size is a parameter: the 128 px stem uses k=5.

    Args:
        n_in: input channels.
        n_out: output channels.
        kernel: square kernel size.
        stride: stride.
        pad: explicit padding applied before the conv (the conv itself pads nothing).
        use_bn: apply a BN after the conv; the conv has a bias only when BN is off.
        pad_mode: ``"constant"`` (zeros) or ``"reflect"``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        kernel: int,
        stride: int,
        pad: int = 0,
        use_bn: bool = False,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode: must be 'constant' or 'reflect', got '{pad_mode}'")
        self.pad: nn.Module
        if pad == 0:
            self.pad = nn.Identity()
        elif pad_mode == "reflect":
            self.pad = nn.ReflectionPad2d(pad)
        else:
            self.pad = nn.ConstantPad2d(pad, 0.0)
        # A bias right before a BN would be cancelled by the BN's mean subtraction.
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, padding=0, bias=not use_bn)
        self.bn = MaybeBatchNorm2d(n_out, True, use_bn)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_in, H, W) -> (B, n_out, (H + 2 pad - kernel) // stride + 1, ...)``."""
        return self.relu(self.bn(self.conv(self.pad(x))))


class ConvResNxN(nn.Module):
    """One residual unit: ``avg-pool shortcut + conv(kxk) -> MaybeBN -> ReLU -> conv(1x1)``.

    Spec section 2.1. The shortcut is ``avg_pool2d(x, width, stride, pad)``, so it has the same
    spatial size as the branch; when ``n_out > n_in`` the extra channels of the shortcut are zero.
    There is deliberately no ReLU on the unit's input or output: the only nonlinearity is inside
    the branch (spec section 11, note 7).

    Args:
        n_in: input channels.
        n_out: output channels, ``>= n_in``.
        width: square kernel size of ``conv1`` and of the shortcut's average pool.
        stride: stride of ``conv1`` and of the pool.
        pad: zero padding of ``conv1`` and of the pool.
        use_bn: apply the BN between the two convs.

    Raises:
        ValueError: if ``n_out < n_in`` (the shortcut can only add channels).
    """

    def __init__(
        self, n_in: int, n_out: int, width: int, stride: int = 1, pad: int = 0, use_bn: bool = False
    ) -> None:
        super().__init__()
        if n_out < n_in:
            raise ValueError(
                f"ConvResNxN: n_out must be >= n_in (the shortcut zero-pads channels), got {n_in} -> {n_out}"
            )
        self.n_in, self.n_out = n_in, n_out
        self.width, self.stride, self.pad = width, stride, pad
        self.conv1 = nn.Conv2d(n_in, n_out, width, stride, pad, bias=False)
        self.bn1 = MaybeBatchNorm2d(n_out, True, use_bn)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.init_weights()

    def init_weights(self, init_scale: float = 1.0) -> None:
        """Default conv init for ``conv1`` scaled by ``init_scale``; ``conv2`` zero (spec 2.5).

        With ``conv2 = 0`` the unit starts as its shortcut alone (Fixup-style).
        """
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.conv1.weight, a=math.sqrt(5))
            self.conv1.weight.mul_(init_scale)
            self.conv2.weight.zero_()

    def shortcut(self, x: Tensor) -> Tensor:
        """``(B, n_in, H, W) -> (B, n_out, H', W')``: average pool, then zero channels appended."""
        h = x
        if self.width > 1 or self.stride > 1 or self.pad > 0:
            h = F.avg_pool2d(x, self.width, self.stride, self.pad)
        if self.n_out > self.n_in:
            # F.pad pads dimensions from the last one backwards: (W, W, H, H, C, C).
            h = F.pad(h, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_in, H, W) -> (B, n_out, (H + 2 pad - width) // stride + 1, ...)``."""
        branch = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return branch + self.shortcut(x)


class ConvResBlock(nn.Module):
    """``depth`` residual units; only the first has a spatial kernel (spec section 2.1).

    The first unit is ``ConvResNxN(n_in -> n_out, width, stride, pad)``, the other ``depth - 1``
    are ``ConvResNxN(n_out -> n_out, 1, 1, 0)``: extra depth adds capacity without growing the
    receptive field.

    Args:
        n_in: input channels.
        n_out: output channels, ``>= n_in``.
        width: kernel size of the first unit.
        stride: stride of the first unit.
        pad: padding of the first unit.
        depth: number of units, ``>= 1``.
        use_bn: apply the BN inside each unit's branch.
    """

    def __init__(
        self, n_in: int, n_out: int, width: int, stride: int, pad: int, depth: int, use_bn: bool = False
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ConvResBlock: depth must be >= 1, got {depth}")
        units = [ConvResNxN(n_in, n_out, width, stride, pad, use_bn)]
        units += [ConvResNxN(n_out, n_out, 1, 1, 0, use_bn) for _ in range(depth - 1)]
        self.layer_list = nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, n_in, H, W) -> (B, n_out, H', W')`` with the first unit's spatial arithmetic."""
        return self.layer_list(x)


class FakeRKHSConvNet(nn.Module):
    """The 1x1 ("network in network") embedding head used on the 5x5 and 7x7 taps (spec 2.1).

    ``out = BN(conv1x1(ReLU(MaybeBN(conv1x1(x)))) + shortcut(x))`` where the shortcut is a 1x1
    conv with bias initialised near the identity. The output BN is always on: with the default
    ``use_bn=False`` it and the encoder's final BN are the only normalisations the loss sees
    (spec section 2.4).

    Args:
        n_input: input channels C_in.
        n_output: embedding dimension n_rkhs.
        use_bn: apply the BN inside the branch (the output BN is applied regardless).
    """

    def __init__(self, n_input: int, n_output: int, use_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_input, n_output, 1, 1, 0, bias=False)
        self.bn1 = MaybeBatchNorm2d(n_output, True, use_bn)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(n_output, n_output, 1, 1, 0, bias=False)
        self.shortcut = nn.Conv2d(n_input, n_output, 1, 1, 0, bias=True)
        self.bn_out = nn.BatchNorm2d(n_output, affine=True)
        self.init_weights()

    def init_weights(self, init_scale: float = 1.0) -> None:
        """``conv1`` default init x ``init_scale``, ``conv2`` zero, shortcut near-identity.

        The shortcut weight is ``U(-0.01, 0.01)`` with ``W[i, i] = 1`` for ``i < C_in`` when
        ``n_rkhs >= C_in``, so the head starts close to "BN of the zero-padded input". Its bias
        keeps the PyTorch default (spec section 2.5).
        """
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.conv1.weight, a=math.sqrt(5))
            self.conv1.weight.mul_(init_scale)
            self.conv2.weight.zero_()
            n_out, n_in = self.shortcut.weight.shape[:2]
            if n_out >= n_in:
                self.shortcut.weight.uniform_(-0.01, 0.01)
                # Direct indexing rather than the official uint8 masked_fill (spec 11, note 1).
                idx = torch.arange(n_in, device=self.shortcut.weight.device)
                self.shortcut.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, n_rkhs, H, W)``."""
        h_res = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return self.bn_out(h_res + self.shortcut(x))


def _top(c: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """The layers every table shares from the 7x7 map up (spec section 2.2): the (off by default)
    BN whose output is the f7 tap, two 3x3 blocks (f5 tap after the first), the unit to 1x1 and
    the always-on BN that gives f1."""
    return [
        MaybeBatchNorm2d(c, True, use_bn),  # 7: f7 tap
        ConvResBlock(c, c, 3, 1, 0, depth, use_bn),  # 5: f5 tap
        ConvResBlock(c, c, 3, 1, 0, depth, use_bn),  # 3
        ConvResNxN(c, n_rkhs, 3, 1, 0, use_bn),  # 1
        nn.BatchNorm2d(n_rkhs, affine=True),  # 1: f1, always on
    ]


def _trunk_32(ndf: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """Layer table of the 32x32 encoder (spec section 2.2); spatial sizes in the comments."""
    return [
        Conv3x3(3, ndf, 3, 1, 0, False),  # 30
        ConvResNxN(ndf, ndf, 1, 1, 0, use_bn),  # 30
        ConvResBlock(ndf, 2 * ndf, 4, 2, 0, depth, use_bn),  # 14
        ConvResBlock(2 * ndf, 4 * ndf, 2, 2, 0, depth, use_bn),  # 7
        *_top(4 * ndf, n_rkhs, depth, use_bn),
    ]


def _trunk_64(ndf: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """Layer table of the 64x64 encoder (spec section 2.2)."""
    return [
        Conv3x3(3, ndf, 3, 1, 0, False),  # 62
        ConvResBlock(ndf, 2 * ndf, 4, 2, 0, depth, use_bn),  # 30
        ConvResBlock(2 * ndf, 4 * ndf, 4, 2, 0, depth, use_bn),  # 14
        ConvResBlock(4 * ndf, 8 * ndf, 2, 2, 0, depth, use_bn),  # 7
        *_top(8 * ndf, n_rkhs, depth, use_bn),
    ]


def _trunk_128(ndf: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """Layer table of the 128x128 encoder (spec section 2.2): a k5 s2 reflect-padded stem first."""
    return [
        Conv3x3(3, ndf, 5, 2, 2, False, pad_mode="reflect"),  # 64
        Conv3x3(ndf, ndf, 3, 1, 0, False),  # 62
        ConvResBlock(ndf, 2 * ndf, 4, 2, 0, depth, use_bn),  # 30
        ConvResBlock(2 * ndf, 4 * ndf, 4, 2, 0, depth, use_bn),  # 14
        ConvResBlock(4 * ndf, 8 * ndf, 2, 2, 0, depth, use_bn),  # 7
        *_top(8 * ndf, n_rkhs, depth, use_bn),
    ]


# Per input size: (trunk builder, width multiple of ndf at the taps, (f5, f7) layer indices); f1
# is the last layer. The official code finds the taps with a dummy forward, taking the last layer
# whose output has each spatial size (spec section 2.3); the indices below are that result,
# checked by the tests, and need no forward pass (so an encoder can be built on ``meta``).
_TABLES = {
    32: (_trunk_32, 4, (5, 4)),
    64: (_trunk_64, 8, (5, 4)),
    128: (_trunk_128, 8, (6, 5)),
}


class Encoder(nn.Module):
    """The AMDIM encoder for 32, 64 or 128 px inputs (spec section 2).

    ``forward`` encodes **one** batch. Training encodes the two views with two separate calls,
    ``encoder(x1)`` then ``encoder(x2)``, so that the (train-mode) BN statistics are computed per
    view and never mix the views (spec sections 2.4 and 11, note 5); do not concatenate them.

    Attributes:
        layers: the trunk, one module per row of the spec's layer table.
        rkhs_5: embedding head on the 5x5 tap, ``C_tap -> n_rkhs``.
        rkhs_7: embedding head on the 7x7 tap, ``C_tap -> n_rkhs``.
        tap_channels: C_tap, channels of the 5x5 and 7x7 taps (4 ndf at 32 px, 8 ndf otherwise).
        tap_5: index in ``layers`` of the 5x5 tap f5 (the first 3x3 block).
        tap_7: index in ``layers`` of the 7x7 tap f7 (the MaybeBN after the third stride-2 block).
        n_rkhs: embedding dimension.

    Args:
        cfg: ``image_size`` (32, 64 or 128), ``ndf``, ``n_rkhs``, ``n_depth`` and ``use_bn`` are
            used; ``n_rkhs`` must be at least the tap width, since the last residual unit can
            only add channels.

    Raises:
        ConfigError: (a ``ValueError``) naming the invalid field.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.image_size not in _TABLES:
            raise ConfigError(f"model.image_size: must be one of {ENCODER_SIZES}, got {cfg.image_size}")
        if cfg.ndf < 1:
            raise ConfigError(f"model.ndf: must be >= 1, got {cfg.ndf}")
        if cfg.n_depth < 1:
            raise ConfigError(f"model.n_depth: must be >= 1, got {cfg.n_depth}")
        build, mult, (self.tap_5, self.tap_7) = _TABLES[cfg.image_size]
        self.tap_channels = mult * cfg.ndf
        if cfg.n_rkhs < self.tap_channels:
            raise ConfigError(
                f"model.n_rkhs: must be >= {self.tap_channels} ({mult} x ndf at {cfg.image_size} px), "
                f"got {cfg.n_rkhs}"
            )
        self.image_size = cfg.image_size
        self.n_rkhs = cfg.n_rkhs
        self.layers = nn.ModuleList(build(cfg.ndf, cfg.n_rkhs, cfg.n_depth, cfg.use_bn))
        self.rkhs_5 = FakeRKHSConvNet(self.tap_channels, cfg.n_rkhs, cfg.use_bn)
        self.rkhs_7 = FakeRKHSConvNet(self.tap_channels, cfg.n_rkhs, cfg.use_bn)
        self.init_weights(1.0)

    def init_weights(self, init_scale: float = 1.0) -> None:
        """Re-initialise every residual unit and embedding head (spec section 2.5).

        ``conv1`` gets the default conv init times ``init_scale``, ``conv2`` is zeroed, and the
        heads' shortcuts start near the identity. The stem, the shortcut biases and the BNs keep
        the PyTorch defaults. Called by the constructor, so a new encoder starts with zero
        ``conv2``.
        """
        for module in self.modules():
            if isinstance(module, (ConvResNxN, FakeRKHSConvNet)):
                module.init_weights(init_scale)

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the trunk ``layers`` only (the spec's "trunk" count, section 2.6)."""
        return self.layers.parameters()

    def layer_outputs(self, x: Tensor) -> list[Tensor]:
        """Every trunk layer's output, in order, for ``x`` of shape ``(B, 3, S, S)``.

        The last element is ``f1`` of shape ``(B, n_rkhs, 1, 1)``.
        """
        outs = []
        h = x
        for layer in self.layers:
            h = layer(h)
            outs.append(h)
        return outs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode one batch (one view) into the three embeddings (spec section 2.3).

        Args:
            x: images, ``(B, 3, S, S)`` float with ``S = image_size``; channels_last is fine.

        Returns:
            ``(r1, r5, r7)``: ``r1`` is the final BN output ``(B, n_rkhs, 1, 1)`` with no further
            embedding or L2 normalisation; ``r5 = rkhs_5(f5)`` is ``(B, n_rkhs, 5, 5)``;
            ``r7 = rkhs_7(f7)`` is ``(B, n_rkhs, 7, 7)``.
        """
        # Keep only the two intermediate taps rather than every layer's output.
        f5 = f7 = x
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i == self.tap_5:
                f5 = h
            elif i == self.tap_7:
                f7 = h
        return h, self.rkhs_5(f5), self.rkhs_7(f7)


__all__ = [
    "ENCODER_SIZES",
    "Conv3x3",
    "ConvResBlock",
    "ConvResNxN",
    "Encoder",
    "FakeRKHSConvNet",
    "MaybeBatchNorm2d",
    "count_parameters",
]
