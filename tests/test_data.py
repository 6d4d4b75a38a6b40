"""Datasets by spec string and the loaders (spec section 5.4)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.config import AUG_CIFAR, AUG_IMAGENET, AUG_STL10, DataConfig
from amdim.data import (
    DevicePrefetcher,
    ImageFiles,
    eval_loader,
    load_data,
    shard_indices,
    steps_per_epoch,
    synthetic_images,
    train_loader,
)
from amdim.errors import ConfigError, DataError

CIFAR_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset.npz"  # ../shared
SMALL = "synthetic:n_train=200,n_test=60"
TV = replace(AUG_CIFAR, impl="torchvision")


@pytest.fixture(scope="module")
def small():
    return load_data(SMALL)


def one_line_error(spec: str, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        load_data(spec)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_bit_identical_across_runs():
    a, b = load_data("synthetic:n_train=64,n_test=16"), load_data("synthetic:n_train=64,n_test=16")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert torch.equal(a.train_labels, b.train_labels) and a.mean == b.mean and a.std == b.std
    # A golden digest: integer-only generation gives these bytes on any machine.
    digest = hashlib.sha256(a.train_images.numpy().tobytes() + a.train_labels.numpy().tobytes()).hexdigest()
    assert digest == GOLDEN_SYNTHETIC
    other = load_data("synthetic:n_train=64,n_test=16,seed=1")
    assert not torch.equal(a.train_images, other.train_images)


GOLDEN_SYNTHETIC = "621eb3a999f6623b8cf398d45603abf282fc2a2e5a010413606cdc6bb350ed67"


def test_synthetic_labels_shapes_and_info(small):
    assert small.train_images.shape == (200, 3, 32, 32) and small.train_images.dtype == torch.uint8
    assert small.test_images.shape == (60, 3, 32, 32)
    assert small.train_labels.dtype == torch.int64 and small.n_classes == 10
    counts = torch.bincount(small.train_labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    assert (
        small.family == "cifar"
        and small.default_aug == AUG_CIFAR
        and small.probe_images is small.train_images
    )
    assert all(0.3 < m < 0.7 for m in small.mean) and all(0.2 < s < 0.4 for s in small.std)
    seven = load_data("synthetic:n_train=70,n_test=14,classes=7,size=48", image_size=32)
    assert seven.n_classes == 7 and set(seven.train_labels.tolist()) == set(range(7))
    assert seven.train_images.shape[-1] == 48
    assert load_data("synthetic:n_train=8,n_test=4", image_size=64).image_size == 64


def test_synthetic_class_is_in_the_shape_not_the_colour():
    x, y = synthetic_images(1200, 32, 10, torch.Generator().manual_seed(0))
    train, test = slice(0, 1000), slice(1000, 1200)

    def centroid_accuracy(feats: torch.Tensor) -> float:
        mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
        f = (feats - mu) / sd
        centres = torch.stack([f[train][y[train] == k].mean(0) for k in range(10)])
        return float((torch.cdist(f[test], centres).argmin(1) == y[test]).float().mean())

    # A translation- and polarity-invariant shape feature: the log power spectrum of the luma.
    gray = x.float().mean(1)
    spectrum = torch.log1p(torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs()).flatten(1)
    assert centroid_accuracy(spectrum) > 0.6  # chance is 0.1
    assert centroid_accuracy(x.float().mean((2, 3))) < 0.25  # mean colour says little


# --- npz and errors -------------------------------------------------------------------------------


def write_npz(path, **overrides):
    g = np.random.default_rng(0)
    arrays = {
        "x_train": g.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": g.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8),
        "y_test": np.arange(6) % 4,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def test_npz_loads_and_reports(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    b = load_data(f"npz:{path}")
    assert b.train_images.shape == (20, 3, 8, 8) and b.test_labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert b.n_classes == 4 and b.family == "cifar" and b.name == "npz:d.npz"
    assert torch.equal(b.train_images, torch.from_numpy(np.load(path)["x_train"]))
    expected_mean = np.load(path)["x_train"].astype(np.float64).mean((0, 2, 3)) / 255
    assert np.allclose(b.mean, expected_mean, atol=1e-4)
    y = np.arange(20) % 4
    y[10:] = -1
    partly = load_data(f"npz:{write_npz(tmp_path / 'p.npz', y_train=y)}")
    assert len(partly.probe_labels) == 10 and (partly.probe_labels >= 0).all()


@pytest.mark.skipif(not os.path.exists(CIFAR_SUBSET), reason="CIFAR-10 subset not present")
def test_npz_real_cifar_subset():
    b = load_data(f"npz:{CIFAR_SUBSET}")
    assert b.train_images.shape == (4068, 3, 32, 32) and b.test_images.shape == (1017, 3, 32, 32)
    assert b.n_classes == 10 and b.family == "cifar"
    cifar_mean = (125.3 / 255, 123.0 / 255, 113.9 / 255)
    assert all(abs(a - c) < 0.03 for a, c in zip(b.mean, cifar_mean))


def test_data_errors_are_one_line(tmp_path):
    one_line_error("npz:/no/such/file.npz", "/no/such/file.npz", "x_train")
    one_line_error(
        "cifar10:/no/cifar", "/no/cifar", "torchvision.datasets.CIFAR10('/no/cifar', download=True)"
    )
    one_line_error("cifar100:/no/c100", "CIFAR100")
    one_line_error("stl10:/no/stl", "STL10", "train+unlabeled")
    one_line_error("imagefolder:/no/imagenet", "/no/imagenet", "train/<class>")
    one_line_error("mnist:/data", "unknown kind 'mnist'", "cifar10:ROOT", "npz:PATH")
    one_line_error("cifar10", "needs a path")
    one_line_error("synthetic:n_train=ten", "integer")
    one_line_error("synthetic:colour=1", "n_train")
    one_line_error("synthetic:classes=40", "classes")
    missing = write_npz(tmp_path / "m.npz", y_test=None)
    one_line_error(f"npz:{missing}", "missing key(s) y_test")
    floats = write_npz(tmp_path / "f.npz", x_train=np.zeros((20, 3, 8, 8), np.float32))
    one_line_error(f"npz:{floats}", "x_train must be uint8", "float32")
    nhwc = write_npz(tmp_path / "h.npz", x_train=np.zeros((20, 8, 8, 3), np.uint8))
    one_line_error(f"npz:{nhwc}", "NHWC")
    short = write_npz(tmp_path / "s.npz", y_train=np.zeros(3, np.int64))
    one_line_error(f"npz:{short}", "y_train")


def test_a_damaged_npz_is_one_line_and_found_from_its_index(tmp_path):
    """A file that is no npz archive, or one cut short, is refused by check_readable (the launchers'
    check, which reads only the archive's directory and the arrays' headers) with the same line
    load_data gives; data damaged past the headers only load_data can see, also in one line."""
    from amdim.data import check_readable

    good = Path(write_npz(tmp_path / "good.npz"))
    cases = {
        "text.npz": b"x_train,y_train\n1,2\n",  # a text file given as npz:PATH
        "truncated.npz": good.read_bytes()[: good.stat().st_size // 2],
        "empty.npz": b"",
    }
    np.save(tmp_path / "array.npy", np.zeros((2, 3), np.uint8))
    cases["array.npz"] = (tmp_path / "array.npy").read_bytes()  # one .npy array, not an archive
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        spec = f"npz:{tmp_path / name}"
        with pytest.raises(DataError) as checked:
            check_readable(spec)
        assert str(checked.value) == one_line_error(spec, name, "not a readable .npz archive")
    big = Path(
        write_npz(
            tmp_path / "big.npz", x_train=np.ones((2000, 3, 8, 8), np.uint8), y_train=np.arange(2000) % 4
        )
    )
    damaged = bytearray(big.read_bytes())  # x_train larger than a zip read: its header reads alone
    start = (
        damaged.index(b"\x93NUMPY", damaged.index(b"x_train.npy")) + 200
    )  # x_train's data, past its header
    damaged[start : start + 64] = bytes(64)
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    check_readable(f"npz:{tmp_path / 'damaged.npz'}")  # its index is intact
    one_line_error(f"npz:{tmp_path / 'damaged.npz'}", "cannot read", "CRC")


def test_check_readable_refuses_what_load_data_refuses(tmp_path):
    from amdim.data import check_readable

    (tmp_path / "cifar-10-batches-py").mkdir()
    for f in ("batches.meta", "data_batch_1", "test_batch"):
        (tmp_path / "cifar-10-batches-py" / f).write_bytes(b"x")
    specs = [
        "npz:/no/such/file.npz", "cifar10:/no/cifar", "stl10:/no/stl", "imagefolder:/no/imagenet",
        "mnist:/data", "synthetic:n_train=ten", f"npz:{write_npz(tmp_path / 'm.npz', y_test=None)}",
        f"npz:{write_npz(tmp_path / 'h.npz', x_train=np.zeros((20, 8, 8, 3), np.uint8))}",
    ]  # fmt: skip
    for spec in specs:
        with pytest.raises(DataError) as checked:
            check_readable(spec)
        assert str(checked.value) == one_line_error(spec)
    with pytest.raises(DataError, match="lacks data_batch_2, data_batch_3, data_batch_4, data_batch_5"):
        check_readable(f"cifar10:{tmp_path}")
    make_folder(tmp_path / "folder")
    check_readable(f"imagefolder:{tmp_path / 'folder'}")
    check_readable(f"npz:{write_npz(tmp_path / 'ok.npz')}")
    check_readable("synthetic:n_train=64")


def test_corrupt_cifar_folder_is_a_data_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    one_line_error(f"cifar10:{tmp_path}", "download=True")


# --- image folders --------------------------------------------------------------------------------


def make_folder(root, train="train", val="val"):
    g = np.random.default_rng(0)
    for split, n in ((train, 3), (val, 2)):
        for cls in ("cat", "dog"):
            os.makedirs(root / split / cls)
            for k in range(n):
                size = (50, 40) if k % 2 else (36, 60)  # (width, height): both orientations
                pixels = g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k}.png")
    (root / train / "cat" / "notes.txt").write_text("ignored")
    return root


def test_imagefolder_decodes_lazily_to_fixed_size(tmp_path):
    make_folder(tmp_path)
    b = load_data(f"imagefolder:{tmp_path}", image_size=32)
    assert isinstance(b.train_images, ImageFiles) and len(b.train_images) == 6 and len(b.test_images) == 4
    assert b.n_classes == 2 and b.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and b.family == "imagenet"
    decode = round(32 * 146 / 128)
    img = b.train_images[1]
    assert img.shape == (3, decode, decode) and img.dtype == torch.uint8
    # training: two uint8 crops of the whole photos at the model's size (tests/test_photo_crops.py)
    batches = list(train_loader(b, DataConfig(batch_size=4), AUG_IMAGENET, 32, seed=0, epoch=0))
    assert len(batches) == 1 and [t.shape for t in batches[0][:2]] == [(4, 3, 32, 32)] * 2
    assert batches[0][0].dtype == torch.uint8
    # without the crop (aug.crop=false) the centre squares, as before
    flat = list(
        train_loader(b, DataConfig(batch_size=4), replace(AUG_IMAGENET, crop=False), 32, seed=0, epoch=0)
    )
    assert len(flat[0]) == 2 and flat[0][0].shape == (4, 3, decode, decode)
    cfg = replace(AUG_IMAGENET, test_resize=decode)
    x, y = next(iter(eval_loader(b.test_images, b.test_labels, cfg, 32, 4, b.mean, b.std)))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    custom = load_data(f"imagefolder:{tmp_path},decode=40", image_size=32)
    assert custom.train_images[0].shape == (3, 40, 40)


def test_imagefolder_accepts_official_names_and_rejects_flat_val(tmp_path):
    make_folder(tmp_path / "a", train="ILSVRC2012_img_train", val="ILSVRC2012_img_val")
    assert load_data(f"imagefolder:{tmp_path / 'a'}").n_classes == 2
    make_folder(tmp_path / "b")
    for f in (tmp_path / "b" / "val" / "dog").iterdir():
        f.rename(tmp_path / "b" / "val" / f"dog_{f.name}")
    (tmp_path / "b" / "val" / "dog").rmdir()
    (tmp_path / "b" / "val" / "cat").rename(tmp_path / "b" / "val" / "lion")
    one_line_error(f"imagefolder:{tmp_path / 'b'}", "lion")


# --- loaders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_shards_and_equal_batch_counts(small, drop_last):
    cfg = DataConfig(batch_size=32, drop_last=drop_last)
    loaders = [
        train_loader(small, cfg, AUG_CIFAR, 32, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) == (6 if drop_last else 7)
    seen = [torch.cat([b.flatten() for b in loader.batches]) for loader in loaders]
    sizes = [16] * 6 if drop_last else [16] * 6 + [4]  # 100 samples per rank
    assert all([len(b) for b in loader.batches] == sizes for loader in loaders)
    if drop_last:
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
    else:
        assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(200))
    x, y = next(iter(loaders[0]))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, small.train_images[loaders[0].batches[0]])


def test_shard_indices_like_distributed_sampler():
    parts = [shard_indices(10, seed=0, epoch=0, rank=r, world_size=3, drop_last=False) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(torch.cat(parts).tolist()) == set(range(10))
    parts = [shard_indices(10, seed=0, epoch=0, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and len(set(torch.cat(parts).tolist())) == 9


def test_epoch_order_is_reproducible_and_resumable(small):
    cfg = DataConfig(batch_size=32)

    def order(epoch, start_step=0):
        loader = train_loader(small, cfg, AUG_CIFAR, 32, seed=7, epoch=epoch, start_step=start_step)
        return [b.tolist() for b in loader.batches]

    assert order(2) == order(2) and order(2) != order(3)
    assert order(2, start_step=2) == order(2)[2:]


def test_torchvision_loader_yields_views_reproducibly(small):
    cfg = DataConfig(batch_size=32)
    first = list(train_loader(small, cfg, TV, 32, seed=1, epoch=0, world_size=2, rank=1))
    again = list(
        train_loader(small, replace(cfg, num_workers=2), TV, 32, seed=1, epoch=0, world_size=2, rank=1)
    )
    v1, v2, y = first[0]
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32 and y.dtype == torch.int64
    assert not torch.equal(v1, v2)
    for a, b in zip(first, again):  # the same views whatever the number of workers
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_loader_errors(small):
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        train_loader(small, DataConfig(batch_size=33), AUG_CIFAR, 32, seed=0, epoch=0, world_size=2)
    with pytest.raises(DataError, match="no full batch"):
        train_loader(small, DataConfig(batch_size=256), AUG_CIFAR, 32, seed=0, epoch=0)


def test_eval_loader_batches_in_order(small):
    loader = eval_loader(
        small.test_images, small.test_labels, AUG_CIFAR, 32, 25, mean=small.mean, std=small.std
    )
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [25, 25, 10]
    assert torch.equal(torch.cat([y for _, y in batches]), small.test_labels)
    x = torch.cat([x for x, _ in batches])
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.3
    dropped = eval_loader(
        small.test_images,
        small.test_labels,
        AUG_CIFAR,
        32,
        25,
        mean=small.mean,
        std=small.std,
        drop_last=True,
        shuffle_seed=0,
    )
    labels = torch.cat([y for _, y in dropped])
    assert len(labels) == 50 and not torch.equal(labels, small.test_labels[:50])


@pytest.mark.parametrize(
    "side, family, aug", [(32, "cifar", AUG_CIFAR), (96, "stl10", AUG_STL10), (128, "imagenet", AUG_IMAGENET)]
)
def test_a_datasets_image_size_picks_its_augmentation(tmp_path, side, family, aug):
    """An npz of 32, 96 or 128 px images is augmented as CIFAR, STL-10 or ImageNet (spec 5.2)."""
    path = write_npz(tmp_path / "d.npz", x_train=np.zeros((20, 3, side, side), np.uint8),
                     x_test=np.zeros((6, 3, side, side), np.uint8))  # fmt: skip
    bundle = load_data(f"npz:{path}")
    assert (bundle.family, bundle.default_aug) == (family, aug)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_steps_per_epoch_matches_the_loader(small, drop_last, world_size):
    cfg = DataConfig(batch_size=24, drop_last=drop_last)
    expected = steps_per_epoch(small, cfg, world_size)
    for rank in range(world_size):
        loader = train_loader(small, cfg, AUG_CIFAR, 32, seed=0, epoch=0, rank=rank, world_size=world_size)
        assert len(loader) == expected


def test_eval_loader_shards_cover_the_test_set_once(small):
    labels = []
    for rank in range(3):
        loader = eval_loader(
            small.test_images,
            torch.arange(60),
            AUG_CIFAR,
            32,
            8,
            small.mean,
            small.std,
            rank=rank,
            world_size=3,
        )
        labels += [y for _, y in loader]
    assert sorted(torch.cat(labels).tolist()) == list(range(60))


# --- moving batches to the device ---------------------------------------------------------------


def test_prefetcher_passes_batches_through_off_cuda(small):
    loader = train_loader(small, DataConfig(batch_size=32), AUG_CIFAR, 32, seed=1, epoch=0)
    plain = list(loader)
    fetched = list(DevicePrefetcher(loader, torch.device("cpu")))
    assert len(fetched) == len(plain) == len(loader)
    for (x, y), (px, py) in zip(fetched, plain):
        assert torch.equal(x, px) and torch.equal(y, py)


@pytest.mark.cuda
def test_prefetcher_delivers_pinned_batches_on_the_gpu_in_order(small):
    cuda = torch.device("cuda")
    for impl in (AUG_CIFAR, TV):
        plain = list(train_loader(small, DataConfig(batch_size=32), impl, 32, seed=1, epoch=0))
        pinned = train_loader(small, DataConfig(batch_size=32), impl, 32, seed=1, epoch=0, pin_memory=True)
        assert all(t.is_pinned() for t in next(iter(pinned)))
        fetched = []
        for batch in DevicePrefetcher(pinned, cuda):
            assert all(t.device.type == "cuda" for t in batch)
            fetched.append(tuple(t * 1 for t in batch))  # compute on the batch, as the step would
        torch.cuda.synchronize()
        assert len(fetched) == len(plain)
        for got, want in zip(fetched, plain):
            for g, w in zip(got, want):
                assert torch.equal(g.cpu(), w)


def test_online_val_split_of_an_image_folder_loads_the_held_out_files(tmp_path):
    from amdim.data import hold_out_online_val

    make_folder(tmp_path)
    b = load_data(f"imagefolder:{tmp_path}", image_size=32)
    masked, val = hold_out_online_val(b, 0.34, seed=0)  # one image of each class
    assert len(val) == 2 and masked.train_labels[val].tolist() == [-1, -1]
    decode = round(32 * 146 / 128)
    cfg = replace(AUG_IMAGENET, test_resize=decode)
    (x, y), *rest = eval_loader(b.train_images, b.train_labels, cfg, 32, 8, b.mean, b.std, indices=val)
    assert not rest and x.shape == (2, 3, 32, 32) and y.tolist() == b.train_labels[val].tolist() == [0, 1]


def test_training_and_the_probe_on_the_default_path_never_import_torchvision(tmp_path):
    """Importing torchvision costs about 1.5 s (it imports torch._dynamo); every new study trial
    actor and every `amdim` command paid it before it was imported on use. The batched default
    path at the dataset's own size, the online evaluation and the offline probe never need it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from amdim.config import preset, with_overrides\n"
        "from amdim import cli, trainer\n"
        "from amdim.evaluate import final_evaluation\n"
        "from amdim.harness import study, trial\n"
        "cfg = with_overrides(preset('tiny'), {'data.spec': 'synthetic:n_train=128,n_test=64',\n"
        "    'train.epochs': 1, 'train.max_steps_per_epoch': 2, 'probe.epochs': 1})\n"
        "state = trainer.fit(cfg)\n"
        "from amdim import data\n"
        "final_evaluation(state.core, cfg, data.load_data(cfg.data.spec, 32), 'cpu', epoch=1)\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
