"""Image preprocessing for calibration: one :class:`ImageRecipe` turns an image file into a model input.

The pipeline for one image (``H, W`` = ``recipe.size``):

1. decode with Pillow and convert to 8-bit RGB (grey, palette and RGBA images too);
2. geometry: with ``crop="center"`` and ``resize_shorter=s``, resize (bilinear, antialiased) so the shorter
   side is ``s`` and the longer ``floor(s * long / short)``, then cut the centred ``H x W`` window at
   ``top = round((h - H) / 2)``, ``left = round((w - W) / 2)`` (torchvision's ``Resize`` + ``CenterCrop``);
   otherwise resize straight to ``H x W`` (the aspect ratio is not kept);
3. channel order: ``BGR`` reverses the channel axis;
4. numerics, per output channel ``c`` (in the final channel order):
   ``y[c] = (x[c] / scale - mean[c]) / std[c]`` in float32;
5. layout: ``NCHW`` gives a ``(3, H, W)`` array, ``NHWC`` gives ``(H, W, 3)`` (no batch axis).

It also checks that a model input can take such images and loads one batch of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxq.data.calibset import InputInfo
from onnxq.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_LAYOUTS = ("NCHW", "NHWC")
_ORDERS = ("RGB", "BGR")
_CROPS = ("center", "none")


@dataclass(frozen=True)
class ImageRecipe:
    """How to turn an image file into a float32 model input (see the module docstring for the math).

    Attributes:
        size: final ``(H, W)``.
        resize_shorter: resize the shorter side to this first (then centre-crop); ``None`` resizes
            directly to ``size``.
        crop: ``"center"`` or ``"none"`` (``"none"`` resizes directly to ``size``).
        scale: pixels are divided by this first (1.0 keeps 0..255, 255.0 gives 0..1).
        mean: subtracted per output channel after scaling (1 or 3 values).
        std: divides per output channel after the mean (1 or 3 values).
        layout: ``"NCHW"`` (array is CHW) or ``"NHWC"`` (array is HWC).
        channel_order: ``"RGB"`` or ``"BGR"``; ``mean``/``std`` are given in this order.
    """

    size: tuple[int, int] = (224, 224)
    resize_shorter: int | None = 256
    crop: str = "center"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.size)
        if len(size) != 2 or min(size) <= 0:
            raise UserError(f"image size {self.size!r} is invalid: give two positive integers (H, W)")
        object.__setattr__(self, "size", size)
        crop = str(self.crop).lower()
        if crop not in _CROPS:
            raise UserError(f"image crop {self.crop!r} is unknown: use 'center' or 'none'")
        object.__setattr__(self, "crop", crop)
        if self.resize_shorter is not None:
            if int(self.resize_shorter) <= 0:
                raise UserError(f"resize_shorter={self.resize_shorter} must be positive (or None)")
            object.__setattr__(self, "resize_shorter", int(self.resize_shorter))
            if crop == "center" and self.resize_shorter < max(size):
                raise UserError(
                    f"resize_shorter={self.resize_shorter} is smaller than the crop {size[0]}x{size[1]}: "
                    f"resize to at least {max(size)} or set crop=none"
                )
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise UserError(
                f"image scale={self.scale} must be a positive number (1 keeps 0..255, 255 gives 0..1)"
            )
        object.__setattr__(self, "scale", float(self.scale))
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) not in (1, 3) or not all(np.isfinite(values)):
                raise UserError(f"image {field}={getattr(self, field)!r} needs 1 or 3 finite values")
            object.__setattr__(self, field, values)
        if any(v == 0.0 for v in self.std):
            raise UserError(f"image std={self.std} contains 0: every std must be non-zero")
        layout, order = str(self.layout).upper(), str(self.channel_order).upper()
        if layout not in _LAYOUTS:
            raise UserError(f"image layout {self.layout!r} is unknown: use NCHW or NHWC")
        if order not in _ORDERS:
            raise UserError(f"image channel order {self.channel_order!r} is unknown: use RGB or BGR")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "channel_order", order)

    @property
    def is_identity(self) -> bool:
        """True when the numerics leave pixel values unchanged (scale 1, mean 0, std 1)."""
        return self.scale == 1.0 and all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    @classmethod
    def from_string(cls, text: str) -> ImageRecipe:
        """Parse ``"preset,key=value,..."``.

        An optional preset name (a token without ``=``, see :data:`PRESETS`) gives the starting values; the
        keys then override them: ``resize=256|none``, ``crop=224|HxW|center|none`` (a number also sets the
        size), ``size=224|HxW``, ``scale=255``, ``mean=0.485/0.456/0.406``, ``std=...``,
        ``layout=NCHW|NHWC``, ``order=RGB|BGR``.

        Example: ``"resize=256,crop=224,scale=255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"``.
        """
        tokens = [t.strip() for t in str(text).split(",") if t.strip()]
        if not tokens:
            raise UserError(
                f"image recipe {text!r} is empty: give a preset ({', '.join(PRESETS)}) or key=value pairs"
            )
        presets = [t for t in tokens if "=" not in t]
        if len(presets) > 1:
            raise UserError(f"image recipe {text!r} names several presets {presets}: keep one")
        base = _preset(presets[0]) if presets else cls()
        changes: dict[str, object] = {}
        for token in tokens:
            if "=" not in token:
                continue
            key, _, value = (s.strip() for s in token.partition("="))
            changes.update(_parse_item(key.lower(), value, text))
        if "size" in changes and "_crop_size" in changes and changes["size"] != changes["_crop_size"]:
            raise UserError(f"image recipe {text!r} gives crop and size that differ: give only one")
        if "_crop_size" in changes:
            changes["size"] = changes.pop("_crop_size")
        return dataclasses.replace(base, **changes)

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Read one image and return a float32 ``(3, H, W)`` (NCHW) or ``(H, W, 3)`` (NHWC) array.

        Raises:
            UserError: the file is missing or is not a readable image.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(f"image '{path}' has more pixels than Pillow's limit ({Image.MAX_IMAGE_PIXELS}), a guard "
                            "against decompression bombs: downscale it or remove it from the folder") from None
        except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"cannot read image '{path}': {exc}: remove or replace the file") from exc
        height, width = self.size
        if self.crop == "center" and self.resize_shorter is not None:
            short, long_ = sorted((rgb.width, rgb.height))
            new_long = int(self.resize_shorter * long_ / short)
            if rgb.width <= rgb.height:
                new_w, new_h = self.resize_shorter, new_long
            else:
                new_w, new_h = new_long, self.resize_shorter
            if (new_w, new_h) != (rgb.width, rgb.height):
                rgb = rgb.resize((new_w, new_h), Image.BILINEAR)
            top = int(round((new_h - height) / 2.0))
            left = int(round((new_w - width) / 2.0))
            rgb = rgb.crop((left, top, left + width, top + height))
        elif (rgb.width, rgb.height) != (width, height):
            rgb = rgb.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.float32)  # (H, W, 3), RGB
        if self.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        out = (pixels / np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out, dtype=np.float32)


def _preset(name: str) -> ImageRecipe:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UserError(f"unknown image preset {name!r}: use one of {sorted(PRESETS)}") from None


def _parse_size(value: str, text: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    try:
        ints = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"image recipe {text!r}: size {value!r} is not N or HxW") from None
    if len(ints) == 1:
        return (ints[0], ints[0])
    if len(ints) == 2:
        return (ints[0], ints[1])
    raise UserError(f"image recipe {text!r}: size {value!r} is not N or HxW")


def _parse_floats(key: str, value: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split("/"))
    except ValueError:
        raise UserError(f"image recipe {text!r}: {key}={value!r} is not numbers separated by '/'") from None


def _parse_item(key: str, value: str, text: str) -> dict[str, object]:
    """Map one ``key=value`` token of a recipe string to dataclass field changes."""
    low = value.lower()
    if key in ("resize", "resize_shorter"):
        if low == "none":
            return {"resize_shorter": None}
        try:
            return {"resize_shorter": int(value)}
        except ValueError:
            raise UserError(f"image recipe {text!r}: resize={value!r} is not an integer or 'none'") from None
    if key == "crop":
        if low in _CROPS:
            return {"crop": low}
        return {"crop": "center", "_crop_size": _parse_size(value, text)}
    if key == "size":
        return {"size": _parse_size(value, text)}
    if key == "scale":
        scale = _parse_floats(key, value, text)
        if len(scale) != 1:
            raise UserError(f"image recipe {text!r}: scale={value!r} must be one number")
        return {"scale": scale[0]}
    if key in ("mean", "std"):
        return {key: _parse_floats(key, value, text)}
    if key == "layout":
        return {"layout": value}
    if key in ("order", "channel_order"):
        return {"channel_order": value}
    raise UserError(
        f"image recipe {text!r}: unknown key {key!r}: use resize, crop, size, scale, mean, std, layout, order"
    )


def list_images(directory: str | os.PathLike[str]) -> list[Path]:
    """Image files (by extension, case-insensitive) directly inside ``directory``, sorted by name."""
    root = Path(directory)
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def require_image_model(inputs: Sequence[InputInfo]) -> InputInfo:
    """The model's only input, which must be rank 4 (or of unknown rank)."""
    if len(inputs) != 1:
        raise UserError(
            f"images feed one input but the model has inputs {[i.name for i in inputs]}: "
            "save the feeds in an .npz with one array per input"
        )
    info = inputs[0]
    if info.shape is not None and len(info.shape) != 4:
        raise UserError(
            f"model input '{info.name}' has shape {info.describe()}, not an image batch (rank 4): "
            "pass an .npz or .npy file instead of images"
        )
    return info


def check_image_input(inputs: Sequence[InputInfo], recipe: ImageRecipe) -> InputInfo:
    """Check that the model's single input can take images made by ``recipe`` (dtype, layout, size)."""
    info = require_image_model(inputs)
    if info.dtype.kind not in "fiu" or (info.dtype.kind in "iu" and not recipe.is_identity):
        raise UserError(
            f"model input '{info.name}' is {info.dtype}, which normalised image pixels cannot feed: "
            "use the 'raw' preset for integer inputs, or pass an .npz"
        )
    if info.shape is None:
        return info
    nchw = recipe.layout == "NCHW"
    channels, other, other_layout = (1, 3, "NHWC") if nchw else (3, 1, "NCHW")
    if isinstance(info.shape[channels], int) and info.shape[channels] != 3:
        if info.shape[other] == 3:
            raise UserError(
                f"model input '{info.name}' has shape {info.describe()}, which is {other_layout}, but the "
                f"image recipe makes {recipe.layout}: use layout={other_layout}"
            )
        raise UserError(
            f"model input '{info.name}' wants {info.shape[channels]} channels on axis {channels} but images "
            "give 3: convert the data yourself and pass an .npz"
        )
    spatial = info.shape[2:] if nchw else info.shape[1:3]
    if any(isinstance(want, int) and want != have for want, have in zip(spatial, recipe.size)):
        h, w = (v if isinstance(v, int) else recipe.size[k] for k, v in enumerate(spatial))
        raise UserError(
            f"model input '{info.name}' has shape {info.describe()} but the image recipe makes "
            f"{recipe.size[0]}x{recipe.size[1]} images: use size={h}x{w} (or crop={h}x{w})"
        )
    return info


def load_batch(
    recipe: ImageRecipe, paths: Sequence[Path], info: InputInfo, index: int
) -> dict[str, np.ndarray]:
    """Feed ``{info.name: (len(paths), ...) array}`` of batch ``index``, cast to the input's dtype.

    Integer inputs (only with an identity recipe) get rounded pixels clipped to the dtype's range.
    """
    try:
        pixels = np.stack([recipe.load(p) for p in paths])
    except UserError as exc:
        raise UserError(f"calibration batch {index}: {exc}") from None
    if info.dtype.kind in "iu":
        limits = np.iinfo(info.dtype)
        pixels = np.clip(np.rint(pixels), limits.min, limits.max)
    return {info.name: pixels.astype(info.dtype)}


PRESETS: dict[str, ImageRecipe] = {
    # torchvision: Resize(256), CenterCrop(224), ToTensor (/255), Normalize(mean, std).
    "imagenet": ImageRecipe(
        scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), layout="NCHW", channel_order="RGB"
    ),
    # EfficientNet-Lite (TF-Lite convention): (x - 127) / 128 on 0..255 pixels.
    "efficientnet-lite": ImageRecipe(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    # No normalisation: 0..255 float pixels, resize 256 / centre crop 224, NCHW RGB.
    "raw": ImageRecipe(),
}
