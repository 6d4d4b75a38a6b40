"""Typed, frozen configuration for AMDIM, its presets, and the one flat form used everywhere else.

A hyperparameter flows: study spec -> Optuna sample -> flat dict (``"loss.tclip": 20.0``) ->
:func:`from_flat` -> these dataclasses -> the module that uses it. :func:`to_flat` is the inverse,
and its keys are the names used for ``--set``, the Tune search space, MLflow params and table
columns, so names never drift between layers.

Flat values are scalars only (bool, int, float, str or ``None``); tuple fields are written as
comma-separated strings (``"loss.pairs": "1t5,1t7,5t5"``) so that MLflow and Optuna can store them.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from amdim.errors import ConfigError

NCE_PAIRS = ("1t5", "1t7", "5t5")
"""The antecedent->consequent pairs the official code optimises (spec section 3.2)."""

_ENCODER_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder size (spec section 2). ``image_size`` picks the layer table (32, 64 or 128 px)."""

    image_size: int = 32
    ndf: int = 128
    n_rkhs: int = 1024
    n_depth: int = 3
    use_bn: bool = False
    mlp_hidden: int = 1024  # online MLP probe width (spec section 6.1)
    mlp_dropout: float = 0.2


@dataclass(frozen=True)
class LossConfig:
    """Multiscale NCE (spec section 3) and mixture-based representations (spec section 4).

    ``tclip=None`` turns the soft clip off; ``reg_weight=0`` turns the score regulariser off.
    ``n_mix > 1`` replaces the global antecedent of the pairs in ``mix_pairs`` by ``n_mix``
    mixture components. The entropy weight is ``mix_alpha``; setting ``mix_tau`` instead uses the
    equivalent temperature (``alpha = 1 / tau``), since the closed-form ``q`` is
    ``softmax(s_nce / alpha)``.
    """

    pairs: tuple[str, ...] = NCE_PAIRS
    reg_weight: float = 0.05  # public code; the paper text gives 0.04 [SEC/RECALL]
    tclip: float | None = 20.0
    n_mix: int = 1
    mix_alpha: float | None = 1.0  # [RECALL]: value not given by any source
    mix_tau: float | None = None
    mix_pairs: tuple[str, ...] = ("1t7",)  # [RECALL]: the paper's formula uses the 7x7 map
    mix_hidden: int = 0  # hidden width of the mixture MLP; 0 means n_rkhs


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation (spec section 5.2); every strength is a field.

    The geometric step is a random resized crop when ``crop`` is true (STL-10, ImageNet) and a
    reflect-padded integer translation otherwise (CIFAR). The colour jitter ranges are
    ``jitter_strength`` times the per-component values. One flip is shared by both views.
    ``impl`` picks per-image torchvision transforms or the batched on-device path.
    """

    flip_p: float = 0.5
    crop: bool = False
    crop_scale_min: float = 0.3
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 0.7
    crop_ratio_max: float = 1.4
    translate_px: int = 4
    translate_p: float = 0.8
    jitter_strength: float = 1.0
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.2
    jitter_p: float = 0.8
    gray_p: float = 0.25
    test_resize: int = 0  # shorter side before the centre crop at test time; 0 = none (CIFAR)
    impl: str = "batched"

    def jitter(self) -> tuple[float, float, float, float]:
        """Effective (brightness, contrast, saturation, hue) ranges; hue is capped at 0.5."""
        s = self.jitter_strength
        return (
            s * self.jitter_brightness,
            s * self.jitter_contrast,
            s * self.jitter_saturation,
            min(0.5, s * self.jitter_hue),
        )


# An on/off option whose "auto" is decided per device (amdim.speed); true/false as given.
Switch = typing.Literal["auto", "true", "false"]

# The dataset kinds a data spec ("kind:path,...") may name; loaded by amdim.data.load_data.
DATA_KINDS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder", "npz")


def dataset_name(spec: str) -> str:
    """The dataset a data spec reads, as results tables name it: the kind for cifar10, cifar100
    and stl10 (where their folders lie does not change what they hold); the file's name without
    ``.npz`` for ``npz:PATH`` and the folder's name for ``imagefolder:ROOT`` (their kind alone would
    put different datasets in one column); the whole spec for ``synthetic`` with options, whose
    options make different images."""
    import os

    text = spec.strip()
    kind, _, rest = text.partition(":")
    if kind == "synthetic":
        return text if rest else kind
    if kind not in ("npz", "imagefolder"):
        return kind
    base = os.path.basename(rest.split(",")[0].rstrip("/\\"))
    return (base.removesuffix(".npz") if kind == "npz" else base) or kind


def data_spec_problem(spec: str) -> str | None:
    """What is wrong with a data spec that can be seen without loading it (an unknown kind, a
    missing path), or None. Cheap: a launcher checks this before it starts any process."""
    from pathlib import Path

    kind, _, rest = spec.strip().partition(":")
    if kind not in DATA_KINDS:
        return f"unknown dataset kind {kind!r} in {spec!r} (allowed: {', '.join(DATA_KINDS)})"
    if kind == "synthetic":
        return None
    path = rest.split(",")[0]
    if not path:
        return f"{kind} needs a path, e.g. {kind}:/data/{kind}"
    if not Path(path).expanduser().exists():
        return f"dataset path {path} does not exist (data spec {spec!r})"
    return None


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute against this process's working directory: Ray trials
    and workers run in other working directories, and a study resumed elsewhere must find it too."""
    import os

    kind, sep, rest = spec.strip().partition(":")
    if kind == "synthetic" or not sep or not rest:
        return spec
    path, *opts = rest.split(",")
    return ",".join([f"{kind}:{os.path.abspath(os.path.expanduser(path))}", *opts])


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is batched. ``spec`` is a data spec string (see amdim.data)."""

    spec: str = "synthetic"
    batch_size: int = 200
    # Loader worker processes. -1 (auto): for image folders, the CPUs this process may use less
    # one, at most 8 (decoding and cropping photos); 0 for data held in memory, which the
    # training thread slices at no cost. >= 0: that many.
    num_workers: int = -1
    drop_last: bool = True
    # > 0: this fraction of the labelled training images (stratified, seeded by train.seed) is
    # hidden from the online probes' labels and scores them every epoch as val_acc_lin/val_acc_mlp,
    # so early stopping need not look at the test set. The encoder still trains on those images.
    online_val_fraction: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warm-up and a multi-step decay (spec section 7).

    ``milestones`` are fractions of the training epochs, so that a shortened run keeps the
    schedule's shape: (250/300, 280/300) gives the official [250, 280] for 300 epochs.
    """

    lr: float = 2e-4
    beta1: float = 0.8
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-5
    warmup_steps: int = 500
    milestones: tuple[float, ...] = (250 / 300, 280 / 300)
    gamma: float = 0.2
    fused: Switch = "auto"  # fused Adam: auto = as measured for the device (amdim.speed)


@dataclass(frozen=True)
class TrainConfig:
    """The training run: length, seed, device and the speed options."""

    epochs: int = 300
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    # The speed options; "auto" resolves by what the machine reports (amdim.speed): bf16 on CUDA
    # and on CPUs with native bf16 (AMX-BF16 / AVX512-BF16); channels_last as measured per device.
    amp: str = "auto"  # auto | bf16 | off
    # The precision of the fp32 matmuls, the NCE score matmul above all (it runs in fp32 even under
    # autocast): "fp32" full precision; "tf32" TF32 tensor cores (CUDA only; a CPU runs fp32);
    # "bf16" the NCE scores from bf16 inputs with fp32 accumulation, on any device; "auto" = tf32
    # on CUDA, fp32 on a CPU.
    matmul_precision: str = "auto"  # auto | fp32 | tf32 | bf16
    channels_last: Switch = "auto"
    compile: bool = False
    # torch.compile's backend when train.compile is on: inductor (generated kernels), or e.g. eager
    # (graph capture only: how scripts/gpu-check --dry-run keeps its CPU rehearsal short).
    compile_backend: str = "inductor"
    log_every: int = 50
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 caps it (smoke tests)
    # Spec 6.2: before each online evaluation, refresh the BN running statistics with forward
    # passes in train mode (no labels, no grad). "eval": on the images about to be evaluated
    # (the official code: test images for the test evaluation); "train": on training images
    # (stricter: evaluation never adapts to the evaluated images); "off": the running statistics
    # from training as they are.
    eval_bn_warmup: str = "off"
    eval_bn_warmup_batches: int = 50
    # Per-epoch signals on the online validation split (only with data.online_val_fraction > 0;
    # amdim.signals): weighted kNN accuracy ``val_acc_knn`` of the split's r1 features against a
    # bank of labelled training images outside the split (a seeded subset of at most knn_bank
    # images, embedded with the test transform each epoch; 0 switches kNN off), voting with the
    # knn_k nearest by cosine similarity weighted exp(s / knn_temperature); and ``rankme``, the
    # effective rank of the split's r1 features. Defaults k 20, T 0.07: solo-learn's and DINO's
    # (DINO: "20 is usually working the best"); lightly's k 200 suits 50k-image banks, and with a
    # few hundred images per class it would reach across classes.
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 10000
    # MLflow system metrics (CPU and memory use, and GPU utilisation where a GPU is present)
    # sampled every this many seconds while the run trains; 0 switches them off.
    system_metrics_s: float = 10.0


@dataclass(frozen=True)
class ProbeConfig:
    """Offline linear probe on frozen global features (see amdim.linear_eval)."""

    epochs: int = 100
    batch_size: int = 256
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    val_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


SECTIONS = tuple(f.name for f in fields(Config))

# --- augmentation families (spec section 5.2 / 5.3) --------------------------------------------

AUG_CIFAR = AugConfig()
AUG_STL10 = AugConfig(crop=True, translate_px=0, translate_p=0.0, test_resize=70)
AUG_IMAGENET = AugConfig(crop=True, translate_px=0, translate_p=0.0, jitter_hue=0.1, test_resize=146)

# --- presets ------------------------------------------------------------------------------------

_CIFAR_OPTIM = OptimConfig()
_IMAGENET_OPTIM = OptimConfig(milestones=(30 / 50, 45 / 50))

PRESETS: dict[str, Config] = {
    # CPU demo and tests: the 32 px topology at a width a 2-core laptop trains in minutes. Its
    # Adam settings are the optimiser study's best on real CIFAR-10 images at this size and a few
    # epochs, which beat the paper's (lr 2e-4, weight decay 1e-5, beta1 0.8) by 4.6 validation
    # points [2.6, 6.5] over 6 seeds each (docs/results.md); the larger presets keep the paper's.
    "tiny": Config(
        model=ModelConfig(ndf=32, n_rkhs=256, n_depth=1, mlp_hidden=256),
        data=DataConfig(batch_size=64),
        optim=OptimConfig(lr=0.00115756, weight_decay=2.0858e-07, beta1=0.934273, warmup_steps=163),
        train=TrainConfig(epochs=3, log_every=10),
        probe=ProbeConfig(epochs=50),
    ),
    # train.py defaults of the official code (spec section 2.6, 12).
    "cifar": Config(),
    # Paper "AMDIM-large" CIFAR configuration, Table 2(b) per amdim-public issue #3; B = 480.
    "cifar-large": Config(
        model=ModelConfig(ndf=256, n_rkhs=2048, n_depth=10), data=DataConfig(batch_size=480)
    ),
    "stl10": Config(
        model=ModelConfig(image_size=64, ndf=192, n_rkhs=1536, n_depth=8),
        aug=AUG_STL10,
        data=DataConfig(batch_size=480),
    ),
    "imagenet-small": Config(
        model=ModelConfig(image_size=128, ndf=192, n_rkhs=1536, n_depth=8),
        aug=AUG_IMAGENET,
        data=DataConfig(batch_size=480),
        optim=_IMAGENET_OPTIM,
        train=TrainConfig(epochs=50),
    ),
    "imagenet-large": Config(
        model=ModelConfig(image_size=128, ndf=320, n_rkhs=2560, n_depth=10),
        aug=AUG_IMAGENET,
        data=DataConfig(batch_size=480),
        optim=_IMAGENET_OPTIM,
        train=TrainConfig(epochs=50),
    ),
}


def preset(name: str) -> Config:
    """The named preset, validated."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


# --- flat form ----------------------------------------------------------------------------------


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(_encode_scalar(v) for v in value)
    return value


def _encode_scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def to_flat(cfg: Config) -> dict[str, Any]:
    """``{"section.field": scalar}`` for every field of ``cfg``, in declaration order."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in fields(sub):
            out[f"{section}.{f.name}"] = _encode(getattr(sub, f.name))
    return out


def all_keys() -> list[str]:
    return list(to_flat(Config()))


# Keys added after runs were first recorded, whose defaults reproduce the behaviour from before
# they existed: a recorded run without them still rebuilds (``amdim rerun``).
ADDED_KEYS = (
    "data.online_val_fraction",
    "train.eval_bn_warmup",
    "train.eval_bn_warmup_batches",
    "train.knn_k",
    "train.knn_temperature",
    "train.knn_bank",
    "train.system_metrics_s",
    "train.compile_backend",
)


def resolve_key(key: str) -> str:
    """Full ``section.field`` name for ``key``; a bare field name is accepted when unambiguous."""
    keys = all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{key}: ambiguous key, use one of {', '.join(matches)}")
    raise ConfigError(f"{key}: unknown config key (see `amdim config` for the list)")


_NONE_WORDS = {"none", "null", "off", ""}
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


def _parse_scalar(key: str, typ: Any, value: Any) -> Any:
    """Coerce ``value`` (a string from the command line, or a Python scalar) to ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        inner = next(a for a in args if a is not type(None))
        return _parse_scalar(key, inner, value)
    if origin is tuple:
        inner = args[0]
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return tuple(_parse_scalar(key, inner, v) for v in items)
    if origin is typing.Literal and set(args) == {"auto", "true", "false"}:  # a Switch
        word = str(value).strip().lower()
        if word == "auto":
            return "auto"
        if word in _TRUE_WORDS:
            return "true"
        if word in _FALSE_WORDS:
            return "false"
        raise ConfigError(f"{key}: expected auto, true or false, got '{value}'")
    if typ is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: expected true or false, got '{value}'")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got '{value}'")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got '{value}'") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got '{value}'")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got '{value}'")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got '{value}'") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got '{value}'")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got '{value}'")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with flat ``overrides`` applied (values may be strings), then validated."""
    field_types = {name: _field_types(cls) for name, cls in _section_classes().items()}
    changes: dict[str, dict[str, Any]] = {}
    for raw_key, raw_value in overrides.items():
        key = resolve_key(raw_key)
        section, name = key.split(".", 1)
        changes.setdefault(section, {})[name] = _parse_scalar(key, field_types[section][name], raw_value)
    new = replace(cfg, **{s: replace(getattr(cfg, s), **c) for s, c in changes.items()})
    validate(new)
    return new


def from_flat(flat: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from a (possibly partial) flat dict; missing keys keep defaults."""
    return with_overrides(Config(), flat)


def parse_set_args(items: list[str]) -> dict[str, str]:
    """``["model.ndf=64", ...]`` -> ``{"model.ndf": "64"}`` with a clear error for bad items."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# --- validation (one place, messages name the field and the allowed range) ----------------------


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _prob(key: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be a probability in [0, 1], got {value}")


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError` naming the first invalid field; return ``cfg`` otherwise."""
    m, lo, a, d, o, t, p = cfg.model, cfg.loss, cfg.aug, cfg.data, cfg.optim, cfg.train, cfg.probe
    _check(m.image_size in _ENCODER_SIZES, "model.image_size", f"must be one of {_ENCODER_SIZES}")
    _check(m.ndf >= 1, "model.ndf", f"must be >= 1, got {m.ndf}")
    _check(m.n_depth >= 1, "model.n_depth", f"must be >= 1, got {m.n_depth}")
    top = (4 if m.image_size == 32 else 8) * m.ndf
    _check(
        m.n_rkhs >= top,
        "model.n_rkhs",
        f"must be >= {top} ({top // m.ndf} x ndf at {m.image_size} px), got {m.n_rkhs}",
    )
    _check(m.mlp_hidden >= 1, "model.mlp_hidden", f"must be >= 1, got {m.mlp_hidden}")
    _prob("model.mlp_dropout", m.mlp_dropout)

    _check(len(lo.pairs) > 0, "loss.pairs", f"must name at least one of {', '.join(NCE_PAIRS)}")
    for pair in lo.pairs:
        _check(pair in NCE_PAIRS, "loss.pairs", f"unknown pair '{pair}' (allowed: {', '.join(NCE_PAIRS)})")
    _check(len(set(lo.pairs)) == len(lo.pairs), "loss.pairs", "lists a pair twice")
    _check(lo.reg_weight >= 0, "loss.reg_weight", f"must be >= 0, got {lo.reg_weight}")
    _check(lo.tclip is None or lo.tclip > 0, "loss.tclip", f"must be > 0 or off, got {lo.tclip}")
    _check(lo.n_mix >= 1, "loss.n_mix", f"must be >= 1, got {lo.n_mix}")
    _check(
        (lo.mix_alpha is None) != (lo.mix_tau is None),
        "loss.mix_alpha",
        "set exactly one of loss.mix_alpha and loss.mix_tau (the other to none)",
    )
    _check(lo.mix_alpha is None or lo.mix_alpha > 0, "loss.mix_alpha", f"must be > 0, got {lo.mix_alpha}")
    _check(lo.mix_tau is None or lo.mix_tau > 0, "loss.mix_tau", f"must be > 0, got {lo.mix_tau}")
    for pair in lo.mix_pairs:
        _check(
            pair in ("1t5", "1t7"), "loss.mix_pairs", f"'{pair}' has no global antecedent (allowed: 1t5, 1t7)"
        )
    _check(lo.mix_hidden >= 0, "loss.mix_hidden", f"must be >= 0, got {lo.mix_hidden}")

    for name in ("flip_p", "translate_p", "jitter_p", "gray_p"):
        _prob(f"aug.{name}", getattr(a, name))
    _check(
        0 < a.crop_scale_min <= a.crop_scale_max <= 1,
        "aug.crop_scale_min",
        f"need 0 < crop_scale_min <= crop_scale_max <= 1, got ({a.crop_scale_min}, {a.crop_scale_max})",
    )
    _check(
        0 < a.crop_ratio_min <= a.crop_ratio_max,
        "aug.crop_ratio_min",
        f"need 0 < crop_ratio_min <= crop_ratio_max, got ({a.crop_ratio_min}, {a.crop_ratio_max})",
    )
    _check(
        0 <= a.translate_px < m.image_size // 2, "aug.translate_px", f"must be in [0, {m.image_size // 2})"
    )
    _check(a.jitter_strength >= 0, "aug.jitter_strength", f"must be >= 0, got {a.jitter_strength}")
    for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
        _check(getattr(a, name) >= 0, f"aug.{name}", f"must be >= 0, got {getattr(a, name)}")
    _check(0 <= a.jitter_hue <= 0.5, "aug.jitter_hue", f"must be in [0, 0.5], got {a.jitter_hue}")
    _check(
        a.test_resize == 0 or a.test_resize >= m.image_size,
        "aug.test_resize",
        f"must be 0 or >= {m.image_size}",
    )
    _check(
        a.impl in ("batched", "torchvision"), "aug.impl", f"must be batched or torchvision, got '{a.impl}'"
    )

    _check(bool(d.spec), "data.spec", "must not be empty")
    _check(d.batch_size >= 2, "data.batch_size", f"must be >= 2 (NCE needs negatives), got {d.batch_size}")
    _check(d.num_workers >= -1, "data.num_workers", f"must be -1 (auto) or >= 0, got {d.num_workers}")
    _check(
        0.0 <= d.online_val_fraction <= 0.5,
        "data.online_val_fraction",
        f"must be in [0, 0.5], got {d.online_val_fraction}",
    )

    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _check(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(
        all(0 <= x <= 1 for x in o.milestones), "optim.milestones", "are fractions of the epochs, in [0, 1]"
    )
    _check(list(o.milestones) == sorted(o.milestones), "optim.milestones", "must be increasing")
    _check(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")

    _check(t.epochs >= 0, "train.epochs", f"must be >= 0, got {t.epochs}")
    _check(
        t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got '{t.device}'"
    )
    _check(t.amp in ("auto", "bf16", "off"), "train.amp", f"must be auto, bf16 or off, got '{t.amp}'")
    _check(
        t.matmul_precision in ("auto", "fp32", "tf32", "bf16"),
        "train.matmul_precision",
        f"must be auto, fp32, tf32 or bf16, got '{t.matmul_precision}'",
    )
    for key, value in (("train.channels_last", t.channels_last), ("optim.fused", o.fused)):
        _check(value in ("auto", "true", "false"), key, f"must be auto, true or false, got '{value}'")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(bool(t.compile_backend.strip()), "train.compile_backend", "must name a torch.compile backend")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")
    _check(
        t.eval_bn_warmup in ("off", "eval", "train"),
        "train.eval_bn_warmup",
        f"must be off, eval or train, got '{t.eval_bn_warmup}'",
    )
    _check(t.eval_bn_warmup_batches >= 1, "train.eval_bn_warmup_batches", "must be >= 1")
    _check(t.knn_k >= 1, "train.knn_k", f"must be >= 1, got {t.knn_k}")
    _check(t.knn_temperature > 0, "train.knn_temperature", f"must be > 0, got {t.knn_temperature}")
    _check(t.knn_bank >= 0, "train.knn_bank", f"must be >= 0 (0 = no kNN), got {t.knn_bank}")
    _check(
        t.system_metrics_s >= 0, "train.system_metrics_s", f"must be >= 0 (0 = off), got {t.system_metrics_s}"
    )

    _check(p.epochs >= 1, "probe.epochs", f"must be >= 1, got {p.epochs}")
    _check(p.batch_size >= 1, "probe.batch_size", f"must be >= 1, got {p.batch_size}")
    _check(len(p.lrs) > 0 and all(x > 0 for x in p.lrs), "probe.lrs", "must be positive numbers")
    _check(
        len(p.weight_decays) > 0 and all(x >= 0 for x in p.weight_decays),
        "probe.weight_decays",
        "must be >= 0",
    )
    _check(0 < p.val_fraction < 1, "probe.val_fraction", f"must be in (0, 1), got {p.val_fraction}")
    return cfg


for _name, _cfg in PRESETS.items():
    validate(_cfg)

__all__ = [
    "NCE_PAIRS",
    "PRESETS",
    "AugConfig",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbeConfig",
    "TrainConfig",
    "all_keys",
    "from_flat",
    "parse_set_args",
    "preset",
    "resolve_key",
    "to_flat",
    "validate",
    "with_overrides",
]
