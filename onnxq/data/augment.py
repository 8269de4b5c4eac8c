"""Calibration augmentation for reconstruction: more views of the same few hundred images.

Reconstruction fits a block's rounding to the calibration samples it sees. With a few hundred images
the learned rounding fits those images better than the task (docs/defaults.md, "long"), so extra
views of the same images are extra constraints on the rounding at no labelling cost. The float model's
outputs on an augmented view are the target, as for any calibration sample, so a view needs no
label and need not be "correct": it only has to look like the model's input distribution.

For ``copies = k`` every calibration image x contributes k views after itself:

    view 1      flip(x)                      (horizontal mirror)
    view j > 1  maybe_flip(resize(crop(x)))  (random crop of 35-100 % of the area, aspect ratio
                                              in [3/4, 4/3], resized back bilinearly; flipped with
                                              probability 1/2)

All views come from one seeded generator, so a run is reproducible. Only 4-D float inputs are
images; their layout is NCHW when dimension 1 is the smaller of dimensions 1 and 3 (channels-first),
NHWC otherwise, and the channel dimension must hold at most 4 channels. Other inputs of a sample are
repeated unchanged with every view. The original samples come first, so a consumer that evaluates
on its first samples evaluates on real images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from onnxq.errors import UserError

log = logging.getLogger(__name__)

#: Random-crop area fraction and aspect-ratio range of the views after the first (the flip).
CROP_AREA = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MAX_CHANNELS = 4

Feed = Mapping[str, np.ndarray]


def image_layout(name: str, value: np.ndarray) -> str | None:
    """"NCHW", "NHWC", or None for an input that is not an image (not 4-D float)."""
    if value.ndim != 4 or not np.issubdtype(value.dtype, np.floating):
        return None
    c_first, c_last = value.shape[1], value.shape[3]
    if min(c_first, c_last) > MAX_CHANNELS or c_first == c_last:
        raise UserError(f"calibration augmentation cannot tell the channel axis of input {name!r} with shape "
                        f"{tuple(value.shape)} (needs at most {MAX_CHANNELS} channels, first or last): "
                        "drop the augmentation option")
    return "NCHW" if c_first < c_last else "NHWC"


def _resized_crop(images: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """Crop every NCHW image to its relative box (top, left, height, width) and resize it back."""
    import torch
    import torch.nn.functional as F

    h, w = images.shape[2:]
    out = np.empty_like(images)
    for i, (top, left, ch, cw) in enumerate(boxes):
        r0, c0 = int(round(top * h)), int(round(left * w))
        r1 = max(r0 + 1, min(h, int(round((top + ch) * h))))
        c1 = max(c0 + 1, min(w, int(round((left + cw) * w))))
        crop = torch.from_numpy(np.ascontiguousarray(images[i:i + 1, :, r0:r1, c0:c1], dtype=np.float32))
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    return out


def _random_boxes(rng: np.random.Generator, n: int) -> list[tuple[float, float, float, float]]:
    """Relative crop boxes: area fraction uniform in CROP_AREA, log-uniform aspect ratio in CROP_RATIO."""
    boxes = []
    for _ in range(n):
        area = rng.uniform(*CROP_AREA)
        ratio = float(np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]))))
        ch, cw = min(1.0, np.sqrt(area / ratio)), min(1.0, np.sqrt(area * ratio))
        boxes.append((rng.uniform(0, 1 - ch), rng.uniform(0, 1 - cw), ch, cw))
    return boxes


def _view(feed: Feed, layouts: Mapping[str, str], index: int,
          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """View ``index`` (1: flip; > 1: random resized crop, maybe flipped) of one batched feed."""
    n = next(iter(feed.values())).shape[0]
    boxes = _random_boxes(rng, n) if index > 1 else None
    flips = rng.random(n) < 0.5 if index > 1 else np.ones(n, dtype=bool)
    out = {}
    for name, value in feed.items():
        layout = layouts.get(name)
        if layout is None:
            out[name] = value
            continue
        x = value if layout == "NCHW" else value.transpose(0, 3, 1, 2)
        if boxes is not None:
            x = _resized_crop(x, boxes)
        x = np.where(flips[:, None, None, None], x[..., ::-1], x)
        x = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
        out[name] = np.ascontiguousarray(x, dtype=value.dtype)
    return out


def augment_feeds(feeds: Sequence[Feed], copies: int, seed: int = 0,
                  optional: bool = False) -> list[dict[str, np.ndarray]]:
    """The original batches, then ``copies`` augmented views of each (see the module docstring).

    When no input of the model is an image: UserError, or with ``optional`` the original batches alone
    (logged; a schedule's default views rather than a request)."""
    feeds = [dict(f) for f in feeds]
    if copies <= 0 or not feeds:
        return feeds
    layouts = {k: lay for k, v in feeds[0].items() if (lay := image_layout(k, v)) is not None}
    if not layouts and optional:
        log.info("no 4-D float image input: reconstruction runs without augmented views")
        return feeds
    if not layouts:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds[0].items())
        raise UserError(f"calibration augmentation needs a 4-D float image input, the model takes {shapes}: "
                        "drop the augmentation option")
    rng = np.random.default_rng([seed, 0xA06])
    views = [_view(f, layouts, j, rng) for j in range(1, copies + 1) for f in feeds]
    return feeds + views
