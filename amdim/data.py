"""Datasets by a spec string, and the train / eval loaders (spec section 5.4).

Spec strings (:func:`load_data`):

* ``synthetic[:n_train=2048,n_test=512,size=PX,classes=10,seed=0]`` (the default): shapes on
  textured backgrounds, generated here, bit-identical everywhere (see :func:`synthetic_images`);
* ``cifar10:ROOT``, ``cifar100:ROOT``: torchvision's folders under ROOT (train 50k / test 10k);
* ``stl10:ROOT``: self-supervised train = train + unlabeled (label -1), probes use train (5k),
  test 8k;
* ``imagefolder:ROOT[,decode=PX]``: ``ROOT/{train,val}/<class>/*`` (or ``ILSVRC2012_img_train``,
  ``ILSVRC2012_img_val``, ``places205_256_train``, ``places205_256_val``), decoded lazily;
* ``npz:PATH``: keys x_train, y_train, x_test, y_test; x uint8 (N, 3, H, W), y integer (N,).

Data never downloads. A user mistake (missing folder, bad file, unknown kind) raises
:class:`amdim.errors.DataError` with one line that names the path and how to get the data.

Image folders (ImageNet, Places) are trained on as the paper and the official code train on
them: with ``aug.crop`` on, each training photo is decoded whole and both views are random
resized crops of the whole photo (the aug config's scale and ratio; one flip shared by both),
resized to the model's size, in the loader's worker processes (``data.num_workers``; by default
the CPUs this process may use less one): :class:`PhotoCrops`. The loader yields the two uint8
views, and the colour half of the augmentation (jitter, grayscale, normalisation) runs batched on
the device (:meth:`amdim.augment.BatchedTwoViews.colour`). Evaluation, the probes and BN warm-up
read the photos as :class:`ImageFiles` items: shorter side resized to the decode size (default
``round(image_size * 146 / 128)``, ImageNet's test resize 146 at 128 px) and centre-cropped, then
the test transform's centre crop.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from amdim.augment import TorchvisionTwoViews, _tv, test_transform
from amdim.config import AUG_CIFAR, AUG_IMAGENET, AUG_STL10, AugConfig, DataConfig
from amdim.dataindex import (
    IMAGE_EXTENSIONS,
    KINDS,
    NPZ_KEYS,
    SYNTHETIC_OPTIONS,
    check_readable,
    download_hint,
    imagefolder_dirs,
    npz_index,
    options,
    require_dir,
)
from amdim.errors import ConfigError, DataError
from amdim.linear_eval import stratified_split

# Normalisation per dataset family (spec 5.2) and the augmentation family each one reports.
FAMILY_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "stl10": ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
FAMILY_AUG: dict[str, AugConfig] = {"cifar": AUG_CIFAR, "stl10": AUG_STL10, "imagenet": AUG_IMAGENET}


class ImageFiles(Dataset):
    """Lazily decoded image files: item i is uint8 (3, size, size) (shorter side resized with
    PIL bicubic, then centre-cropped); :meth:`photo` is the whole photo."""

    def __init__(self, files: Sequence[str], size: int) -> None:
        self.files = list(files)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def photo(self, index: int) -> Image.Image:
        """The whole photo, decoded to RGB."""
        path = self.files[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None

    def __getitem__(self, index: int) -> Tensor:
        _, F, bicubic = _tv()  # torchvision, imported on first use
        im = F.resize(self.photo(index), [self.size], interpolation=bicubic)
        return F.pil_to_tensor(F.center_crop(im, [self.size, self.size]))


class PhotoCrops:
    """The geometric half of the training augmentation on a whole photo, per image in a loader
    worker: one horizontal flip (``flip_p``) shared by both views, then for each view
    ``RandomResizedCrop(out_size, scale, ratio)`` of the whole photo with PIL's bicubic resize
    (antialiased when it shrinks). Parameters are drawn with torchvision's own sampler from a
    generator seeded by (seed, epoch, index), so an epoch is reproducible with any number of
    workers or ranks. Returns two uint8 (3, out_size, out_size) views."""

    def __init__(self, cfg: AugConfig, out_size: int) -> None:
        self.cfg, self.out_size = cfg, out_size

    def __call__(self, photo: Image.Image, seed: int) -> tuple[Tensor, Tensor]:
        transforms, F, _ = _tv()
        cfg, out = self.cfg, self.out_size
        scale, ratio = (cfg.crop_scale_min, cfg.crop_scale_max), (cfg.crop_ratio_min, cfg.crop_ratio_max)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flip = bool(torch.rand(()) < cfg.flip_p)
            boxes = [transforms.RandomResizedCrop.get_params(photo, scale, ratio) for _ in range(2)]
        if flip:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views = (
            photo.resize((out, out), Image.Resampling.BICUBIC, box=(j, i, j + w, i + h))
            for i, j, h, w in boxes
        )
        v1, v2 = (F.pil_to_tensor(v) for v in views)
        return v1, v2


def cpu_workers() -> int:
    """Loader workers for decoding photos: the CPUs this process may use (``OMP_NUM_THREADS``
    when set, as Ray sets it to a trial's CPUs; else the CPU affinity) less one for the training
    thread, at most 8."""
    try:
        cpus = int(os.environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def loader_workers(requested: int, images: Any) -> int:
    """``data.num_workers`` resolved: -1 (auto) is :func:`cpu_workers` for image folders and 0
    for images held in memory."""
    if requested >= 0:
        return requested
    return cpu_workers() if isinstance(images, ImageFiles) else 0


Images = Tensor | ImageFiles
"""uint8 (N, 3, H, W) in memory, or a lazy :class:`ImageFiles`."""


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A loaded dataset.

    Images are uint8 (N, 3, H, W) tensors, or :class:`ImageFiles` for image folders; labels are
    int64 (N,) with -1 for unlabelled images. ``probe_*`` is the labelled training set for the
    linear probes (STL-10: its 5k labelled split; otherwise the training set itself). ``family``
    ("cifar", "stl10" or "imagenet") names the normalisation and the augmentation family
    (:data:`FAMILY_AUG`) that suit this data; the preset decides which one is used.
    """

    name: str
    family: str
    n_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_images: Images
    train_labels: Tensor
    test_images: Images
    test_labels: Tensor
    probe_images: Images
    probe_labels: Tensor

    @property
    def image_size(self) -> int:
        """Side of the stored (or decoded) training images."""
        return int(self.train_images.shape[-1])

    @property
    def default_aug(self) -> AugConfig:
        return FAMILY_AUG[self.family]


# --- spec parsing -------------------------------------------------------------------------------


def load_data(spec: str = "synthetic", image_size: int = 32) -> DataBundle:
    """The dataset named by ``spec`` (see the module docstring); ``image_size`` is the model's.

    Raises:
        DataError: one line naming the problem (unknown kind, missing path, malformed file).
    """
    check_readable(spec)  # a user's mistake, from the dataset's index: one line, before any loading
    kind, _, rest = spec.strip().partition(":")
    if kind == "synthetic":
        return _load_synthetic(options(spec, rest, SYNTHETIC_OPTIONS), image_size)
    path, *opts = rest.split(",")
    path = os.path.expanduser(path)
    if kind == "imagefolder":
        decode = options(spec, ",".join(opts), ("decode",)).get("decode", round(image_size * 146 / 128))
        return _load_imagefolder(path, decode)
    if kind == "npz":
        return _load_npz(path)
    if kind == "stl10":
        return _load_stl10(path)
    return _load_cifar(kind, path)


# --- synthetic shapes -----------------------------------------------------------------------------

SHAPES = (
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "hstripes",
    "vstripes",
    "diagonal",
    "checker",
    "xcross",
    "diamond",
    "frame",
)
"""Class k of the synthetic data is SHAPES[k]; its colour, position and size are random."""


def _shape_mask(
    kind: str, dx: Tensor, dy: Tensor, r: Tensor, hp: Tensor, phase: Tensor, sign: Tensor
) -> Tensor:
    """Integer-only inside test. dx (m, 1, S), dy (m, S, 1); other args (m, 1, 1) int."""
    ax, ay = dx.abs(), dy.abs()
    cheb = torch.maximum(ax, ay)
    d2 = dx * dx + dy * dy
    box = cheb <= r

    def bands(t: Tensor, width: Tensor) -> Tensor:
        return torch.div(t + phase, width, rounding_mode="floor") % 2 == 0

    if kind == "disk":
        return d2 <= r * r
    if kind == "square":
        return 5 * cheb <= 4 * r
    if kind == "triangle":  # apex up, base at 3/4 r below the centre
        return (4 * dy <= 3 * r) & (7 * ax <= 4 * (dy + r))
    if kind == "plus":
        w = (r // 4).clamp(min=1)
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if kind == "ring":
        return (d2 <= r * r) & (25 * d2 >= 9 * r * r)
    if kind == "hstripes":
        return box & bands(dy, hp)
    if kind == "vstripes":
        return box & bands(dx, hp)
    if kind == "diagonal":
        return box & bands(sign * dx + dy, hp + 1)
    if kind == "checker":
        cell = hp + 1
        return box & (
            (torch.div(dx, cell, rounding_mode="floor") + torch.div(dy, cell, rounding_mode="floor")) % 2 == 0
        )
    if kind == "xcross":
        return box & ((ax - ay).abs() <= (r // 5).clamp(min=1))
    if kind == "diamond":
        return ax + ay <= r
    if kind == "frame":
        return box & (cheb > r - (r // 3).clamp(min=2))
    raise ValueError(kind)


def _randint(g: torch.Generator, high: int | Tensor, *shape: int) -> Tensor:
    """Integers in [0, high) (``high`` may be a tensor); only integer ops, so bit-exact anywhere."""
    return torch.randint(0, 2**30, shape, generator=g, dtype=torch.int32) % high


def _box_sum(x: Tensor, k: int, out: int, dim: int) -> Tensor:
    """Sums of k consecutive entries along ``dim``, the first ``out`` windows (exact integers)."""
    c = torch.nn.functional.pad(x.cumsum(dim, dtype=torch.int32), (1, 0) if dim == 3 else (0, 0, 1, 0))
    return c.narrow(dim, k, out) - c.narrow(dim, 0, out)


def synthetic_images(n: int, size: int, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` labelled synthetic images: class k is the shape SHAPES[k].

    Each image: a random base colour plus smooth random texture and pixel noise, and one shape of
    class k at a random position and size (radius 20-35 % of ``size``) in a colour whose
    brightness is on the other side of the background's (random polarity), so grayscale and
    colour jitter keep it visible and the class is in the shape, not the colour. Labels are
    exactly balanced (then shuffled). Everything is integer arithmetic on a CPU generator, so a
    seed gives the same bytes on every machine.

    Returns:
        images uint8 (n, 3, size, size), labels int64 (n,).
    """
    if not 1 <= classes <= len(SHAPES):
        raise DataError(f"synthetic: classes must be in [1, {len(SHAPES)}], got {classes}")
    if size < 8:
        raise DataError(f"synthetic: size must be >= 8, got {size}")
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=generator)]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    chunk = 256  # bounds memory at large sizes; fixed, so the draws do not depend on n
    for start in range(0, n, chunk):
        y = labels[start : start + chunk]
        images[start : start + chunk] = _synthetic_chunk(y, size, generator)
    return images, labels


def _synthetic_chunk(labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    m, s = len(labels), size
    lo, hi = max(3, s * 20 // 100), max(3, s * 35 // 100)
    r = lo + _randint(g, hi - lo + 1, m)
    cx = r + _randint(g, s - 2 * r, m)
    cy = r + _randint(g, s - 2 * r, m)
    hp = (r // 4).clamp(min=2) + _randint(g, 2, m)
    phase = _randint(g, 2 * hp, m)
    sign = 2 * _randint(g, 2, m) - 1
    dark = 16 + _randint(g, 85, m, 3)
    light = 156 + _randint(g, 85, m, 3)
    light_shape = _randint(g, 2, m, 1).bool()
    bg = torch.where(light_shape, dark, light)
    fg = torch.where(light_shape, light, dark)
    # Smooth texture: blocks of k px, box-filtered over k px (exact integer sums and floor division).
    k = max(2, s // 8)
    cells = -(-(s + k - 1) // k)
    coarse = _randint(g, 81, m, 3, cells, cells) - 40
    up = coarse.repeat_interleave(k, 2).repeat_interleave(k, 3)
    tex = torch.div(_box_sum(_box_sum(up, k, s, 3), k, s, 2), k * k, rounding_mode="floor")
    noise = _randint(g, 21, m, 3, s, s) - 10
    img = bg[:, :, None, None] + tex + noise
    grid = torch.arange(s)
    mask = torch.zeros(m, s, s, dtype=torch.bool)
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero()[:, 0]
        col = (t[idx, None, None] for t in (r, cx, cy, hp, phase, sign))
        ri, cxi, cyi, hpi, phi, sgi = col
        mask[idx] = _shape_mask(
            SHAPES[label], grid[None, None, :] - cxi, grid[None, :, None] - cyi, ri, hpi, phi, sgi
        )
    img = torch.where(mask[:, None], fg[:, :, None, None] + noise, img)
    return img.clamp(0, 255).to(torch.uint8)


def _exact_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, 3, H, W) in [0, 1], from exact integer sums."""
    count, sums, squares = 0, [0, 0, 0], [0, 0, 0]
    for start in range(0, len(x), 1024):
        part = x[start : start + 1024].to(torch.int64)
        count += part[:, 0].numel()
        for c in range(3):
            sums[c] += int(part[:, c].sum())
            squares[c] += int((part[:, c] * part[:, c]).sum())
    mean = [sums[c] / count for c in range(3)]
    std = [math.sqrt(max(squares[c] / count - mean[c] ** 2, 1e-12)) for c in range(3)]
    return tuple(round(v / 255, 4) for v in mean), tuple(round(v / 255, 4) for v in std)


def _load_synthetic(options: dict[str, int], image_size: int) -> DataBundle:
    size, classes = options.get("size", image_size), options.get("classes", 10)
    g = torch.Generator().manual_seed(options.get("seed", 0))
    x_train, y_train = synthetic_images(options.get("n_train", 2048), size, classes, g)
    x_test, y_test = synthetic_images(options.get("n_test", 512), size, classes, g)
    mean, std = _exact_stats(x_train)
    return DataBundle(
        "synthetic", "cifar", classes, mean, std, x_train, y_train, x_test, y_test, x_train, y_train
    )


# --- files on disk -------------------------------------------------------------------------------


def _family_for_size(side: int) -> str:
    return "cifar" if side <= 32 else "stl10" if side <= 96 else "imagenet"


def _load_npz(path: str) -> DataBundle:
    npz_index(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in NPZ_KEYS}
    except Exception as e:  # a damaged member past its header: bad CRC, truncated data
        raise DataError(f"npz:{path}: cannot read ({type(e).__name__}: {e})") from None
    x_train, x_test = (torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in ("x_train", "x_test"))
    y_train, y_test = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y_train", "y_test"))
    if len(y_test) and int(y_test.min()) < 0:
        raise DataError(f"npz:{path}: y_test has negative labels; test images must be labelled")
    n_classes = int(max(y_train.max() if len(y_train) else 0, y_test.max() if len(y_test) else 0)) + 1
    labelled = y_train >= 0
    probe_x, probe_y = (x_train, y_train) if bool(labelled.all()) else (x_train[labelled], y_train[labelled])
    mean, std = _exact_stats(x_train)
    name = f"npz:{os.path.basename(path)}"
    family = _family_for_size(x_train.shape[-1])
    return DataBundle(name, family, n_classes, mean, std, x_train, y_train, x_test, y_test, probe_x, probe_y)


def _tv_dataset(kind: str, root: str, cls_name: str, **kwargs: Any) -> Any:
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(root, download=False, **kwargs)
    except Exception as e:  # torchvision: "Dataset not found or corrupted."; a damaged batch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{kind}:{root}: {first} {download_hint(cls_name, root)}") from None


def _load_cifar(kind: str, root: str) -> DataBundle:
    cls_name, sub, n_classes = (
        ("CIFAR10", "cifar-10-batches-py", 10) if kind == "cifar10" else ("CIFAR100", "cifar-100-python", 100)
    )
    require_dir(kind, root, sub, download_hint(cls_name, root))
    splits = []
    for train in (True, False):
        ds = _tv_dataset(kind, root, cls_name, train=train)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits += [x, torch.tensor(ds.targets, dtype=torch.int64)]
    x_train, y_train, x_test, y_test = splits
    mean, std = FAMILY_STATS["cifar"]
    return DataBundle(kind, "cifar", n_classes, mean, std, x_train, y_train, x_test, y_test, x_train, y_train)


def _load_stl10(root: str) -> DataBundle:
    require_dir("stl10", root, "stl10_binary", download_hint("STL10", root, ", split='train+unlabeled'"))
    train = _tv_dataset("stl10", root, "STL10", split="train+unlabeled")
    test = _tv_dataset("stl10", root, "STL10", split="test")
    x_train, y_train = torch.from_numpy(train.data), torch.from_numpy(train.labels.astype(np.int64))
    n_labelled = int((y_train >= 0).sum())  # torchvision puts the 5k labelled images first
    x_test, y_test = torch.from_numpy(test.data), torch.from_numpy(test.labels.astype(np.int64))
    mean, std = FAMILY_STATS["stl10"]
    probe_x, probe_y = x_train[:n_labelled], y_train[:n_labelled]
    return DataBundle("stl10", "stl10", 10, mean, std, x_train, y_train, x_test, y_test, probe_x, probe_y)


def _image_files(folder: str, classes: dict[str, int], spec: str) -> tuple[list[str], list[int]]:
    subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not subdirs:
        raise DataError(
            f"{spec}: {folder} has no class subfolders (arrange images as {folder}/<class>/*.jpg)"
        )
    files, labels = [], []
    for name in subdirs:
        if name not in classes:
            raise DataError(f"{spec}: class folder '{name}' in {folder} is not a training class")
        for entry in sorted(os.scandir(os.path.join(folder, name)), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.path)
                labels.append(classes[name])
    if not files:
        raise DataError(f"{spec}: no image files under {folder}")
    return files, labels


def _load_imagefolder(root: str, decode: int) -> DataBundle:
    spec = f"imagefolder:{root}"
    train_dir, val_dir = imagefolder_dirs(root)
    class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    classes = {name: k for k, name in enumerate(class_names)}
    train_files, train_labels = _image_files(train_dir, classes, spec)
    val_files, val_labels = _image_files(val_dir, classes, spec)
    x_train, x_test = ImageFiles(train_files, decode), ImageFiles(val_files, decode)
    y_train, y_test = torch.tensor(train_labels), torch.tensor(val_labels)
    mean, std = FAMILY_STATS["imagenet"]
    name = f"imagefolder:{os.path.basename(os.path.normpath(root))}"
    return DataBundle(
        name, "imagenet", len(classes), mean, std, x_train, y_train, x_test, y_test, x_train, y_train
    )


# --- loaders -------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64 steps), e.g. (seed, epoch, index)."""
    h = 0x9E3779B97F4A7C15
    for key in keys:
        h = (h ^ (key & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


def augment_generator(
    seed: int, epoch: int, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for :class:`~amdim.augment.BatchedTwoViews` on ``device``, seeded by
    (seed, epoch, rank), so an epoch's augmentations are reproducible."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, epoch, rank, 0xA06))


def shard_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool) -> Tensor:
    """This rank's sample order for an epoch, as ``DistributedSampler`` does it.

    A permutation from a generator seeded by (seed, epoch), the same on every rank; with
    ``drop_last`` the tail that does not divide by ``world_size`` is dropped, otherwise the
    permutation is padded by wrapping around; rank r takes every world_size-th sample from r.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    if drop_last:
        perm = perm[: n - n % world_size]
    elif n % world_size:
        pad = world_size - n % world_size
        perm = torch.cat([perm, perm.repeat(pad // n + 1)[:pad]])
    return perm[rank::world_size]


class _Items(Dataset):
    """Index -> (uint8 image, label); (view1, view2, label) with a per-image augmentation; or
    (uint8 view1, uint8 view2, label) with ``crops`` (the whole photo cropped, colour left to
    the device).

    Each image's augmentation RNG is seeded by (seed, epoch, index): reproducible, and the
    same for any number of workers or ranks. With ``whole_photo`` an image folder's item is its
    whole photo (the per-image reference path crops it as the batched path does).
    """

    def __init__(
        self,
        images: Images,
        labels: Tensor,
        augment: TorchvisionTwoViews | None,
        seed: int,
        epoch: int,
        crops: PhotoCrops | None = None,
        whole_photo: bool = False,
    ):
        self.images, self.labels, self.augment, self.crops = images, labels, augment, crops
        self.seed, self.epoch, self.whole_photo = seed, epoch, whole_photo

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        label = int(self.labels[index])
        if self.crops is not None:
            v1, v2 = self.crops(self.images.photo(index), mix_seed(self.seed, self.epoch, index))
            return v1, v2, label
        whole = self.whole_photo
        img = _tv()[1].pil_to_tensor(self.images.photo(index)) if whole else self.images[index]
        if self.augment is None:
            return img, label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            params = self.augment.sample_params(img)
        v1, v2 = self.augment.apply(img, params)
        return v1, v2, label


def _per_rank_batch(data_cfg: DataConfig, world_size: int) -> int:
    if data_cfg.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size: the global batch {data_cfg.batch_size} must divide by world_size {world_size}"
        )
    return data_cfg.batch_size // world_size


def _split(idx: Tensor, batch_size: int, drop_last: bool) -> list[Tensor]:
    count = len(idx) // batch_size if drop_last else -(-len(idx) // batch_size)
    return [idx[k * batch_size : (k + 1) * batch_size] for k in range(count)]


def steps_per_epoch(bundle: DataBundle, data_cfg: DataConfig, world_size: int = 1) -> int:
    """Batches per rank per epoch of :func:`train_loader` (the same on every rank)."""
    batch = _per_rank_batch(data_cfg, world_size)
    n = len(bundle.train_labels)
    per_rank = n // world_size if data_cfg.drop_last else -(-n // world_size)
    return per_rank // batch if data_cfg.drop_last else -(-per_rank // batch)


class TrainLoader:
    """An epoch of training batches for one rank (built by :func:`train_loader`); has a len()."""

    def __init__(
        self,
        items: _Items,
        batches: list[Tensor],
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.items, self.batches = items, batches
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        images, labels = self.items.images, self.items.labels
        if self.items.augment is None and isinstance(images, Tensor):
            for idx in self.batches:  # in memory: slicing beats a DataLoader
                x, y = images[idx], labels[idx]
                yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)
            return
        loader = DataLoader(
            self.items,
            batch_sampler=[b.tolist() for b in self.batches],
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for batch in loader:
            yield tuple(batch)


def train_loader(
    bundle: DataBundle,
    data_cfg: DataConfig,
    aug_cfg: AugConfig,
    image_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    pin_memory: bool = False,
) -> TrainLoader:
    """This rank's training batches for one epoch.

    ``data_cfg.batch_size`` is the global batch: each of ``world_size`` ranks gets
    ``batch_size // world_size`` samples per step (see :func:`shard_indices`; every rank has the
    same number of batches, :func:`steps_per_epoch`). ``data_cfg.drop_last`` drops the ragged
    tail, both across ranks and the last partial batch. The order depends only on (seed, epoch);
    ``start_step`` skips the first batches, to resume mid-epoch.

    Yields, by ``aug_cfg.impl``:
        "batched": ``(x, y)``: uint8 (b, 3, H, W) on CPU and int64 (b,); make the views on the
        device with :class:`~amdim.augment.BatchedTwoViews` (e.g. with :func:`augment_generator`).
        For an image folder with ``aug_cfg.crop``: ``(view1, view2, y)``, uint8 (b, 3, S, S)
        crops of the whole photos (:class:`PhotoCrops`, in the workers); the device adds the
        colour (:meth:`~amdim.augment.BatchedTwoViews.colour`).
        "torchvision": ``(view1, view2, y)``: float32 (b, 3, S, S) normalised views made in the
        DataLoader workers (``data_cfg.num_workers``), and int64 (b,).
    Labels are -1 for unlabelled images (STL-10).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    batch = _per_rank_batch(data_cfg, world_size)
    n = len(bundle.train_labels)
    idx = shard_indices(
        n, seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=data_cfg.drop_last
    )
    batches = _split(idx, batch, data_cfg.drop_last)
    if not batches:
        raise DataError(
            f"{bundle.name}: {n} training images give no full batch of {batch} per rank (lower data.batch_size)"
        )
    augment = crops = None
    whole_photo = isinstance(bundle.train_images, ImageFiles) and aug_cfg.crop
    if aug_cfg.impl == "torchvision":
        augment = TorchvisionTwoViews(aug_cfg, image_size, bundle.mean, bundle.std)
    elif whole_photo:
        crops = PhotoCrops(aug_cfg, image_size)
    items = _Items(bundle.train_images, bundle.train_labels, augment, seed, epoch, crops, whole_photo)
    workers = loader_workers(data_cfg.num_workers, bundle.train_images)
    return TrainLoader(items, batches[start_step:], workers, pin_memory)


def hold_out_online_val(bundle: DataBundle, fraction: float, seed: int) -> tuple[DataBundle, Tensor]:
    """Hide ``fraction`` of each class of the labelled training images from the online probes.

    Returns the bundle with those images' training labels set to -1 (unlabelled: the NCE
    objective still trains on them, the probes' loss ignores them) and their indices into the
    training set; score them against the original ``bundle.train_labels``. The offline probe's
    ``probe_*`` fields are untouched. Deterministic in ``seed``, so every rank holds out the same
    images.
    """
    labels = bundle.train_labels
    labelled = (labels >= 0).nonzero().flatten()
    if len(labelled) < 2:
        raise DataError(f"{bundle.name}: data.online_val_fraction needs labelled training images")
    _, val = stratified_split(labels[labelled], fraction, seed)
    val_idx = labelled[val]
    masked = labels.clone()
    masked[val_idx] = -1
    return replace(bundle, train_labels=masked), val_idx


class DevicePrefetcher:
    """Iterates ``batches`` (tuples of CPU tensors) with each batch already on ``device``.

    On CUDA, batch i+1 is copied host-to-device on a side stream (non-blocking, from pinned
    memory when the loader pins it) while batch i is being trained on; the compute stream waits
    for the copy before it uses the tensors, and ``record_stream`` keeps the caching allocator from
    reusing their memory early. On any other device the batches pass through unchanged (the
    trainer moves them; a CPU "copy" is free).
    """

    def __init__(
        self, batches: Iterator[tuple[Tensor, ...]] | Sequence[tuple[Tensor, ...]], device: torch.device
    ):
        self.batches, self.device = batches, torch.device(device)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self.device.type != "cuda":
            yield from self.batches
            return
        side = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def load(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            side.wait_stream(compute)  # the copy must not overtake work queued before it
            with torch.cuda.stream(side):
                return tuple(t.to(self.device, non_blocking=True) for t in batch)

        it = iter(self.batches)
        nxt = next(it, None)
        ready = load(nxt) if nxt is not None else None
        while ready is not None:
            # Wait for this batch's copy before queueing the next one: waiting after it would make
            # the step wait for the next copy too, and the two would no longer overlap.
            compute.wait_stream(side)
            for t in ready:
                t.record_stream(compute)
            current = ready
            nxt = next(it, None)
            ready = load(nxt) if nxt is not None else None
            yield current


class EvalLoader:
    """Test-transformed batches (built by :func:`eval_loader`); has a len()."""

    def __init__(
        self,
        images: Images,
        labels: Tensor,
        batches: list[Tensor],
        transform: tuple[AugConfig, int, tuple[float, ...], tuple[float, ...]],
        device: torch.device | str | None = None,
        num_workers: int = -1,
    ) -> None:
        self.images, self.labels, self.batches = images, labels, batches
        self.transform, self.device, self.num_workers = transform, device, num_workers

    def __len__(self) -> int:
        return len(self.batches)

    def _raw(self) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(self.images, Tensor):
            for idx in self.batches:
                yield self.images[idx], self.labels[idx]
            return
        items = _Items(self.images, self.labels, None, 0, 0)
        batch_sampler = [b.tolist() for b in self.batches]
        workers = loader_workers(self.num_workers, self.images)
        yield from DataLoader(items, batch_sampler=batch_sampler, num_workers=workers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        cfg, size, mean, std = self.transform
        for x, y in self._raw():
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield test_transform(x, cfg, size, mean, std), y


def eval_loader(
    images: Images,
    labels: Tensor,
    aug_cfg: AugConfig,
    image_size: int,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    num_workers: int = -1,
    drop_last: bool = False,
    shuffle_seed: int | None = None,
    indices: Tensor | None = None,
) -> EvalLoader:
    """Batches ``(x, y)``: x float32 (b, 3, S, S) test-transformed (spec 5.3) and normalised,
    y int64 (b,); on ``device`` when given (the transform then runs there), else CPU.

    In order, keeping the last partial batch, by default; ``drop_last=True`` with a
    ``shuffle_seed`` reproduces the official shuffled, drop-last test loader (spec 11.9).
    With ``world_size > 1``, rank r takes every world_size-th image from r: the ranks cover the
    test set exactly once between them (no padding, so batch counts may differ by one; sum the
    counts and all-reduce once at the end). ``indices`` restricts the loader to those images
    (e.g. the online validation split of the training set, :func:`hold_out_online_val`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    order = torch.arange(len(labels)) if indices is None else indices
    n = len(order)
    if shuffle_seed is not None:
        order = order[torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(shuffle_seed)))]
    batches = _split(order[rank::world_size], batch_size, drop_last)
    transform = (aug_cfg, image_size, tuple(mean), tuple(std))
    return EvalLoader(images, labels, batches, transform, device, num_workers)


__all__ = [
    "FAMILY_AUG",
    "FAMILY_STATS",
    "KINDS",
    "SHAPES",
    "DataBundle",
    "DevicePrefetcher",
    "EvalLoader",
    "ImageFiles",
    "PhotoCrops",
    "TrainLoader",
    "augment_generator",
    "check_readable",
    "cpu_workers",
    "eval_loader",
    "hold_out_online_val",
    "load_data",
    "loader_workers",
    "mix_seed",
    "shard_indices",
    "steps_per_epoch",
    "synthetic_images",
    "train_loader",
]
