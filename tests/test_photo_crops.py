"""Image folders train as the paper does: random resized crops of the whole photo (not of a
centre square), made in the loader's workers, with the colour augmentation batched on the device;
evaluation keeps the shorter-side resize and centre crop."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from amdim import data as data_mod
from amdim import trainer
from amdim.augment import BatchedTwoViews
from amdim.config import AUG_IMAGENET, DataConfig, preset, with_overrides
from amdim.data import ImageFiles, PhotoCrops, cpu_workers, load_data, loader_workers, train_loader

SIZES = [(300, 120), (120, 260), (200, 200), (640, 480)]  # (width, height): wide, tall, square, photo


def coordinate_photo(width: int, height: int) -> Image.Image:
    """Red encodes the column and green the row (0..255 across the photo), so a crop's pixels say
    where in the photo they came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def make_photo_folder(root, sizes=SIZES, per_class: int = 3):
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                w, h = sizes[(c * per_class + k) % len(sizes)]
                coordinate_photo(w, h).save(root / split / cls / f"{k}.jpg", quality=95)
    return root


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_crops_reach_every_part_of_the_photo_not_only_a_centre_square(width, height):
    photo = coordinate_photo(width, height)
    crops = PhotoCrops(replace(AUG_IMAGENET, flip_p=0.0), 32)
    reached = np.zeros((256, 256), dtype=bool)  # (row code, column code) seen in some crop
    for seed in range(150):
        for view in crops(photo, seed):
            assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
            red, green = view[0].numpy(), view[1].numpy()
            reached[green.min() : green.max() + 1, red.min() : red.max() + 1] = True
    cols, rows = reached.any(0), reached.any(1)
    # every column and every row of the photo is inside some crop, the corners included
    assert cols[:6].any() and cols[-6:].any() and rows[:6].any() and rows[-6:].any()
    assert cols.mean() > 0.95 and rows.mean() > 0.95
    # the centre square of the longer side is only part of it: crops go beyond it on both sides
    side = min(width, height)
    if width > height:
        lo, hi = 255 * (width - side) / 2 / width, 255 * (width + side) / 2 / width
        assert cols[: int(lo) - 5].any() and cols[int(hi) + 5 :].any()
    elif height > width:
        lo, hi = 255 * (height - side) / 2 / height, 255 * (height + side) / 2 / height
        assert rows[: int(lo) - 5].any() and rows[int(hi) + 5 :].any()


def test_both_views_share_one_flip_and_differ_in_crop():
    photo = coordinate_photo(300, 120)
    flipped = PhotoCrops(replace(AUG_IMAGENET, flip_p=1.0), 32)(photo, 3)
    plain = PhotoCrops(replace(AUG_IMAGENET, flip_p=0.0), 32)(photo, 3)
    for f, p in zip(flipped, plain):  # a flipped photo: red falls from left to right
        assert f[0, 16, 0] > f[0, 16, -1] and p[0, 16, 0] < p[0, 16, -1]
    assert not torch.equal(plain[0], plain[1])


def test_the_loader_yields_the_same_crops_with_any_number_of_workers(tmp_path):
    b = load_data(f"imagefolder:{make_photo_folder(tmp_path)}", image_size=32)
    cfg = DataConfig(batch_size=3)
    runs = [
        [tuple(t.clone() for t in batch) for batch in train_loader(
            b, replace(cfg, num_workers=n), AUG_IMAGENET, 32, seed=4, epoch=1)]
        for n in (0, 2)
    ]  # fmt: skip
    assert len(runs[0]) == 2
    for one, two in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(one, two))
        assert one[0].dtype == torch.uint8 and one[0].shape == (3, 3, 32, 32)
    other_epoch = next(iter(train_loader(b, cfg, AUG_IMAGENET, 32, seed=4, epoch=2)))
    assert not torch.equal(other_epoch[0], runs[0][0][0])


def test_the_device_adds_colour_and_normalises_the_cropped_views(tmp_path):
    b = load_data(f"imagefolder:{make_photo_folder(tmp_path)}", image_size=32)
    views = BatchedTwoViews(AUG_IMAGENET, 32, b.mean, b.std)
    batch = next(iter(train_loader(b, DataConfig(batch_size=4), AUG_IMAGENET, 32, seed=0, epoch=0)))
    gen = torch.Generator().manual_seed(0)
    x1, x2, y = trainer.views_on_device(batch, views, torch.device("cpu"), gen)
    assert x1.dtype == torch.float32 and x1.shape == x2.shape == (4, 3, 32, 32) and y.shape == (4,)
    # no jitter and no gray: exactly the crops, normalised
    plain = BatchedTwoViews(replace(AUG_IMAGENET, jitter_p=0.0, gray_p=0.0), 32, b.mean, b.std)
    v1, _ = plain.colour(batch[0], batch[1], generator=gen)
    mean, std = torch.tensor(b.mean).view(3, 1, 1), torch.tensor(b.std).view(3, 1, 1)
    torch.testing.assert_close(v1, (batch[0].float() / 255 - mean) / std)


def test_evaluation_keeps_the_centre_crop(tmp_path):
    b = load_data(f"imagefolder:{make_photo_folder(tmp_path)}", image_size=32)
    assert isinstance(b.test_images, ImageFiles)
    decode = round(32 * 146 / 128)
    img = b.test_images[0]  # a 300 x 120 photo: resized to 37 rows, centre columns kept
    assert img.shape == (3, decode, decode)
    red = img[0].float()
    assert 255 * 0.25 < red[:, 0].mean() < 255 * 0.45 and 255 * 0.55 < red[:, -1].mean() < 255 * 0.75


def test_a_short_training_run_on_an_image_folder(tmp_path):
    root = make_photo_folder(tmp_path, per_class=8)
    cfg = with_overrides(preset("tiny"), {
        "data.spec": f"imagefolder:{root}", "data.batch_size": 8, "aug.crop": True,
        "train.epochs": 1, "train.max_steps_per_epoch": 2,
    })  # fmt: skip
    state = trainer.fit(cfg, log=None)
    assert state.step == 2


def test_auto_workers_decode_photos_in_parallel_and_leave_memory_data_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert cpu_workers() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert cpu_workers() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_workers() == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    photos = ImageFiles(["x.jpg"], 37)
    assert loader_workers(-1, photos) == 3 and loader_workers(-1, torch.zeros(1, 3, 8, 8)) == 0
    assert loader_workers(2, torch.zeros(1, 3, 8, 8)) == 2
    assert data_mod.DataConfig().num_workers == -1


def test_the_per_image_reference_path_crops_the_whole_photo_too(tmp_path):
    """aug.impl=torchvision on an image folder: TorchvisionTwoViews gets the whole photo (not the
    centre square) and returns normalised float views at the model's size."""
    # wide photos only: their centre square spans column codes 0.3-0.7
    b = load_data(f"imagefolder:{make_photo_folder(tmp_path, sizes=[(300, 120)])}", image_size=32)
    tv = replace(AUG_IMAGENET, impl="torchvision", flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    reached = set()
    for epoch in range(12):
        v1, v2, _ = next(
            iter(train_loader(b, DataConfig(batch_size=3, num_workers=0), tv, 32, seed=0, epoch=epoch))
        )
        assert v1.dtype == torch.float32 and v1.shape == v2.shape == (3, 3, 32, 32)
        red = v1[:, 0] * b.std[0] + b.mean[0]  # back to [0, 1]: the column code of each pixel
        reached |= {round(float(red.min()), 1), round(float(red.max()), 1)}
    # the crops reach columns near both edges, beyond the centre square
    assert min(reached) <= 0.1 and max(reached) >= 0.9
