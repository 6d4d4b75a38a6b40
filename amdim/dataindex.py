"""What a dataset holds, read from its index without loading it: the checks a launcher makes in
milliseconds before it starts any process that would load the data and fail (see
:func:`check_readable`). Torch-free, so that a study driver needs no torch to make them;
:mod:`amdim.data` loads what passes."""

from __future__ import annotations

import os

import numpy as np

from amdim.config import DATA_KINDS
from amdim.errors import DataError

KINDS = DATA_KINDS
USAGE = "synthetic[:k=v,...], cifar10:ROOT, cifar100:ROOT, stl10:ROOT, imagefolder:ROOT, npz:PATH"
SYNTHETIC_OPTIONS = ("n_train", "n_test", "size", "classes", "seed")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


_DATASET_FILES = {  # what torchvision reads of each downloaded dataset, under ROOT
    "cifar10": (
        "cifar-10-batches-py",
        ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    ),
    "cifar100": ("cifar-100-python", ("meta", "train", "test")),
    "stl10": ("stl10_binary", ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin")),
}
_DOWNLOAD = {
    "cifar10": ("CIFAR10", ""),
    "cifar100": ("CIFAR100", ""),
    "stl10": ("STL10", ", split='train+unlabeled'"),
}


def check_readable(spec: str) -> None:
    """Raise the DataError that :func:`amdim.data.load_data` would raise for ``spec``, found from the dataset's
    index alone (an npz's directory and array headers, the files torchvision reads, an image
    folder's layout), without loading any image: a launcher checks this in milliseconds before it
    starts a process that would load the data and fail."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise DataError(f"data spec '{spec}': unknown kind '{kind}' (allowed: {USAGE})")
    if kind == "synthetic":
        options(spec, rest, SYNTHETIC_OPTIONS)
        return
    path, *opts = rest.split(",")
    if not path:
        raise DataError(f"data spec '{spec}': {kind} needs a path, e.g. {kind}:/data/{kind}")
    path = os.path.expanduser(path)
    if kind == "imagefolder":
        options(spec, ",".join(opts), ("decode",))
        imagefolder_dirs(path)
        return
    if opts:
        raise DataError(f"data spec '{spec}': {kind} takes no options")
    if kind == "npz":
        npz_index(path)
        return
    sub, files = _DATASET_FILES[kind]
    cls_name, extra = _DOWNLOAD[kind]
    require_dir(kind, path, sub, download_hint(cls_name, path, extra))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, sub, f))]
    if missing:
        raise DataError(
            f"{kind}:{path}: {sub}/ lacks {', '.join(missing)} (an interrupted download?); "
            + download_hint(cls_name, path, extra)
        )


def options(spec: str, text: str, allowed: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if key not in allowed or not eq:
            raise DataError(f"data spec '{spec}': bad option '{item}' (allowed: {', '.join(allowed)})")
        try:
            out[key] = int(value)
        except ValueError:
            raise DataError(f"data spec '{spec}': option {key} needs an integer, got '{value}'") from None
        if out[key] < (0 if key == "seed" else 1):
            raise DataError(f"data spec '{spec}': option {key} must be positive, got {value}")
    return out


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz_index(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of an npz file, read from the archive's directory and each
    array's header, not from its data: what a launcher can afford to check before it starts
    anything. Any problem is a one-line DataError (not a file, not an npz, truncated, a damaged
    header, the layout :func:`load_data` needs)."""
    if not os.path.isfile(path):
        raise DataError(
            f"npz:{path}: no such file (an .npz with x_train, y_train, x_test, y_test; uint8 NCHW images)"
        )
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DataError(
            f"npz:{path}: not a readable .npz archive (no zip directory: the file is truncated, or of another kind)"
        ) from None
    index = {}
    with archive:
        try:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
                index[name.removesuffix(".npy")] = (shape, dtype)
        except Exception as e:  # a damaged member (its header, or all of a small one)
            raise DataError(f"npz:{path}: cannot read ({type(e).__name__}: {e})") from None
    missing = [k for k in NPZ_KEYS if k not in index]
    if missing:
        raise DataError(f"npz:{path}: missing key(s) {', '.join(missing)} (need {', '.join(NPZ_KEYS)})")
    for split in ("train", "test"):
        (x_shape, x_dtype), (y_shape, y_dtype) = index[f"x_{split}"], index[f"y_{split}"]
        if x_dtype != np.uint8:
            raise DataError(f"npz:{path}: x_{split} must be uint8, got {x_dtype}")
        if len(x_shape) != 4 or x_shape[1] != 3:
            hint = " (looks like NHWC: transpose to NCHW)" if len(x_shape) == 4 and x_shape[-1] == 3 else ""
            raise DataError(f"npz:{path}: x_{split} must be (N, 3, H, W), got {x_shape}{hint}")
        if not np.issubdtype(y_dtype, np.integer) or y_shape != (x_shape[0],):
            raise DataError(f"npz:{path}: y_{split} must be integer ({x_shape[0]},), got {y_dtype} {y_shape}")
    if index["x_train"][0][1:] != index["x_test"][0][1:]:
        raise DataError(f"npz:{path}: x_train and x_test image shapes differ")
    return index


def require_dir(kind: str, root: str, sub: str, how: str) -> None:
    if not os.path.isdir(os.path.join(root, sub)):
        where = f"{root} does not exist" if not os.path.isdir(root) else f"no {sub}/ under {root}"
        raise DataError(f"{kind}:{root}: {where}; {how}")


def download_hint(cls_name: str, root: str, extra: str = "") -> str:
    return (
        f'download it with: python -c "import torchvision; '
        f"torchvision.datasets.{cls_name}('{root}'{extra}, download=True)\""
    )


def find_dir(root: str, names: tuple[str, ...]) -> str | None:
    return next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)


def imagefolder_dirs(root: str) -> tuple[str, str]:
    """The train and val folders of an image-folder dataset, each with at least one class folder."""
    spec = f"imagefolder:{root}"
    if not os.path.isdir(root):
        raise DataError(
            f"{spec}: {root} does not exist (need {root}/train/<class>/* and {root}/val/<class>/*)"
        )
    train_dir = find_dir(root, ("train", "ILSVRC2012_img_train", "places205_256_train"))
    val_dir = find_dir(root, ("val", "ILSVRC2012_img_val", "places205_256_val"))
    if train_dir is None or val_dir is None:
        raise DataError(
            f"{spec}: need {root}/train/<class>/* and {root}/val/<class>/* "
            "(or ILSVRC2012_img_train / ILSVRC2012_img_val)"
        )
    for folder in (train_dir, val_dir):
        if not any(e.is_dir() for e in os.scandir(folder)):
            raise DataError(
                f"{spec}: {folder} has no class subfolders (arrange images as {folder}/<class>/*.jpg)"
            )
    return train_dir, val_dir
