"""Image-folder loading speed for docs/benchmarks.md: decoded training images per second, per
loader worker (prints one JSON object).

``python -m analysis.bench_photos [--photos 256] [--workers 0,1] [--size 128] [--root DIR]``
    Writes ``--photos`` JPEG photos of ImageNet's typical sizes (500 x 375, 375 x 500, 500 x 333,
    640 x 480, quality 90, smooth gradients plus noise so that they do not compress to nothing)
    into ``--root`` (a temporary folder by default), then times one epoch of
    :func:`amdim.data.train_loader` over them (``aug.crop`` on, ImageNet's augmentation: decode
    the whole photo, flip, two random resized crops to ``--size`` px, as uint8) for each worker
    count. ``0`` workers decodes on the calling thread. Reports images/s and images/s per worker;
    the first batch of each epoch (worker start-up) is timed too, since every epoch pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from amdim import speed
from amdim.config import AUG_IMAGENET, DataConfig
from amdim.data import load_data, train_loader

PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))


def write_photos(root: Path, n: int, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2)):
        for k in range(count):
            cls = root / split / f"c{k % 2}"
            cls.mkdir(parents=True, exist_ok=True)
            w, h = PHOTO_SIZES[k % len(PHOTO_SIZES)]
            x = np.linspace(0, 1, w)[None, :, None]
            y = np.linspace(0, 1, h)[:, None, None]
            base = 255 * (0.5 + 0.25 * np.sin(6 * x + 4 * y + g.uniform(0, 6, (1, 1, 3))))
            pixels = np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(cls / f"{k}.jpg", quality=90)


def time_epoch(root: Path, workers: int, size: int, batch: int) -> dict:
    bundle = load_data(f"imagefolder:{root}", image_size=size)
    cfg = DataConfig(batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for v1, _, _ in train_loader(bundle, cfg, AUG_IMAGENET, size, seed=0, epoch=0):
        n += v1.shape[0]
    seconds = time.perf_counter() - t0
    rate = n / seconds
    return {
        "workers": workers,
        "images": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(rate, 1),
        "images_per_s_per_worker": round(rate / max(workers, 1), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analysis.bench_photos", description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=256, help="training photos to write and load")
    p.add_argument("--workers", default="0,1", help="comma-separated loader worker counts")
    p.add_argument("--size", type=int, default=128, help="the model's image size (crop output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--root", help="folder for the photos (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        write_photos(root, args.photos)
        counts = [int(w) for w in args.workers.split(",")]
        time_epoch(root, 0, args.size, args.batch_size)  # warm the page cache and torchvision's import
        rows = [time_epoch(root, w, args.size, args.batch_size) for w in counts]
    print(json.dumps({
        "photos": args.photos, "photo_sizes": PHOTO_SIZES, "size": args.size, "batch": args.batch_size,
        "cpu": speed.cpu_description(), "cpus_usable": len(os.sched_getaffinity(0)), "epochs": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
