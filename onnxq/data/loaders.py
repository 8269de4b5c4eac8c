"""Calibration data loaders: files, image folders, feed iterables and random data -> :class:`CalibrationSet`.

Capturing intermediate activations is done elsewhere (``onnxq.data.capture``). The core types
(:class:`InputInfo`, :class:`CalibrationSet`, feed validation) live in ``onnxq.data.calibset`` and image
preprocessing in ``onnxq.data.images``; both are re-exported here, so ``onnxq.data.loaders`` is the one import.

Batching ``n`` samples with ``batch_size = b`` gives ``ceil(n / b)`` batches ``[k b, min(n, (k + 1) b))``;
when the model fixes its batch dim to ``b`` the incomplete last batch is dropped (with a warning).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxq.data.calibset import (
    Batch,
    CalibrationSet,
    Feed,
    InputInfo,
    feed_samples,
    is_float,
    model_inputs,
    validate_feed,
)
from onnxq.data.images import (
    IMAGE_EXTENSIONS,
    PRESETS,
    ImageRecipe,
    check_image_input,
    list_images,
    load_batch,
    require_image_model,
)
from onnxq.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS", "CalibrationSet", "ImageRecipe", "InputInfo", "from_image_dir", "from_iterable", "from_npy",
    "from_npz", "load_calibration", "model_inputs", "random_like", "validate_feed",
]

Inputs = Union[onnx.ModelProto, Sequence[InputInfo]]


# ----------------------------------------------------------------------------------------- helpers


def _as_inputs(inputs: Inputs) -> tuple[InputInfo, ...]:
    out = tuple(model_inputs(inputs)) if isinstance(inputs, onnx.ModelProto) else tuple(inputs)
    if not out:
        raise UserError("the model has no inputs to calibrate (all graph inputs are initializers)")
    if not all(isinstance(i, InputInfo) for i in out):
        raise TypeError("inputs must be an onnx.ModelProto or a sequence of InputInfo")
    return out


def _ranges(n: int, batch_size: int, inputs: Sequence[InputInfo], source: str) -> list[tuple[int, int]]:
    """``[start, stop)`` sample ranges of each batch (see module docstring)."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    fixed = {i.name: i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)}
    for name, size in fixed.items():
        if size != batch_size:
            raise UserError(
                f"model input '{name}' has a fixed batch dim of {size} but batch_size={batch_size}: "
                f"use batch_size={size}"
            )
    if fixed and n % batch_size:
        if n < batch_size:
            raise UserError(
                f"{source} has {n} samples, fewer than the model's fixed batch of {batch_size}: add data"
            )
        logger.warning("%s: dropping the last %d samples (the model's batch is fixed to %d)",
                       source, n % batch_size, batch_size)
        n -= n % batch_size
    return [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def _same(value: Any) -> Any:
    return value


class _LazyArray:
    """One array of an .npz/.npy file; ``open()`` gives a memory map (or the whole array), read once."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, open_: Callable[[], np.ndarray]) -> None:
        self.shape, self.dtype, self._open, self._array = shape, dtype, open_, None

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._array is None:
            self._array = self._open()
        return np.array(self._array[start:stop])


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_key(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data[key]


def _open_npz(path: Path) -> dict[str, _LazyArray]:
    """Read the headers of an .npz; stored (uncompressed) members are memory-mapped in place."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot read '{path}' as .npz ({exc}): write it with np.savez") from None
    out: dict[str, _LazyArray] = {}
    with archive, open(path, "rb") as raw:
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    reader = _HEADER_READERS.get(version)
                    shape, fortran, dtype = reader(member) if reader else (None, False, None)
                    header = member.tell()
            except (ValueError, OSError, EOFError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as exc:
                raise UserError(
                    f"member '{info.filename}' of '{path}' is not a readable .npy array ({exc}): write it "
                    "again with np.savez"
                ) from None
            if shape is None:  # rare header versions: read the whole array
                array = _npz_key(path, key)
                out[key] = _LazyArray(array.shape, array.dtype, functools.partial(_same, array))
                continue
            if dtype.hasobject:
                raise UserError(f"array '{key}' in '{path}' holds Python objects: save plain numeric arrays")
            claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if claimed != info.file_size - header:
                raise UserError(f"array '{key}' in '{path}' claims shape {tuple(shape)} ({claimed} bytes) but holds "
                                f"{info.file_size - header} bytes: the file is corrupt; write it again with np.savez")
            if info.compress_type == zipfile.ZIP_STORED and int(np.prod(shape)) > 0:
                raw.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", raw.read(30)[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header
                order = "F" if fortran else "C"
                opener = functools.partial(
                    np.memmap, path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order
                )
            else:
                if info.compress_type != zipfile.ZIP_STORED:
                    logger.info("'%s': array '%s' is compressed and is read whole on first use", path, key)
                opener = functools.partial(_npz_key, path, key)
            out[key] = _LazyArray(tuple(shape), dtype, opener)
    return out


def _arrays_batch(arrays: Mapping[str, _LazyArray], start: int, stop: int) -> Feed:
    return {name: a.rows(start, stop) for name, a in arrays.items()}


def _from_arrays(
    arrays: Mapping[str, _LazyArray], inputs: Sequence[InputInfo], batch_size: int, limit: int | None,
    source: str,
) -> CalibrationSet:
    """Batch arrays that share a leading sample axis; the first batch is checked at once."""
    for name, array in arrays.items():
        if len(array.shape) == 0:
            raise UserError(f"array '{name}' in {source} is a scalar: it needs a leading sample axis")
    counts = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise UserError(
            f"arrays in {source} have different sample counts {counts}: give every array the same first axis"
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise UserError(f"{source} holds no samples: add data")
    if limit is not None:
        n = min(n, _check_limit(limit))
    batches = [
        Batch(k, stop - start, functools.partial(_arrays_batch, arrays, start, stop))
        for k, (start, stop) in enumerate(_ranges(n, batch_size, inputs, source))
    ]
    out = CalibrationSet(inputs, batches, source=source)
    out[0]  # fail now, not in the middle of calibration, when the arrays do not fit the model
    return out


def _check_limit(limit: int) -> int:
    if limit < 1:
        raise UserError(f"limit={limit} must be at least 1 (or None for all samples)")
    return limit


# ----------------------------------------------------------------------------------------- loaders


def from_npz(
    path: str | os.PathLike[str], inputs: Inputs, *, batch_size: int = 1, limit: int | None = None
) -> CalibrationSet:
    """Batches from an .npz holding one ``(N, ...)`` array per model input, named after the input.

    A single-array file for a single-input model is accepted whatever its key. Uncompressed files
    (``np.savez``) are memory-mapped; compressed members are read whole on first use.
    """
    inputs, path = _as_inputs(inputs), _existing(path)
    arrays = _open_npz(path)
    names = [i.name for i in inputs]
    if set(arrays) != set(names):
        if len(arrays) == 1 and len(names) == 1:
            logger.info("'%s': using its only array '%s' for input '%s'", path, next(iter(arrays)), names[0])
            arrays = {names[0]: next(iter(arrays.values()))}
        else:
            raise UserError(
                f"'{path}' holds arrays {sorted(arrays)} but the model inputs are {names}: "
                f"save one array per input under its name, e.g. np.savez(path, **{{'{names[0]}': x}})"
            )
    return _from_arrays(arrays, inputs, batch_size, limit, f"'{path}'")


def from_npy(
    path: str | os.PathLike[str], inputs: Inputs, *, batch_size: int = 1, limit: int | None = None
) -> CalibrationSet:
    """Batches from one memory-mapped ``(N, ...)`` .npy array (single-input models only)."""
    inputs, path = _as_inputs(inputs), _existing(path)
    if len(inputs) != 1:
        raise UserError(
            f"'{path}' is one array but the model has inputs {[i.name for i in inputs]}: "
            "save one array per input in an .npz (np.savez(path, name=array, ...))"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read '{path}' as .npy ({exc}): write it with np.save") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"'{path}' is an .npz archive, not one .npy array: name it .npz")
    lazy = _LazyArray(array.shape, array.dtype, functools.partial(_same, array))
    return _from_arrays({inputs[0].name: lazy}, inputs, batch_size, limit, f"'{path}'")


def from_image_dir(
    path: str | os.PathLike[str], inputs: Inputs, recipe: ImageRecipe | str, *, batch_size: int = 1,
    limit: int | None = None, files: Sequence[str | os.PathLike[str]] | None = None,
) -> CalibrationSet:
    """Batches of images from a directory (sorted ``*.jpg/.jpeg/.png/.bmp/.webp``), read per batch on request.

    Args:
        path: the directory; ``files`` (if given) are taken relative to it instead of listing it.
        inputs: the model (or its inputs); it must have one rank-4 image input.
        recipe: an :class:`ImageRecipe` or a recipe string (``"imagenet"``, ``"resize=256,crop=224,..."``).
        batch_size: images per batch.
        limit: use at most this many images (the first ones in sorted order).
        files: explicit image files, in this order.
    """
    inputs = _as_inputs(inputs)
    recipe = recipe if isinstance(recipe, ImageRecipe) else ImageRecipe.from_string(recipe)
    info = check_image_input(inputs, recipe)
    root = Path(path)
    if files is None:
        if not root.is_dir():
            raise UserError(
                f"calibration image directory '{root}' does not exist: pass an existing directory"
            )
        paths = list_images(root)
        if not paths:
            raise UserError(
                f"'{root}' has no images ({'/'.join(sorted(IMAGE_EXTENSIONS))}): "
                "add images or pass an .npz file"
            )
    else:
        paths = [root / p for p in files]
        absent = [str(p) for p in paths if not p.is_file()]
        if not paths or absent:
            raise UserError(f"calibration image files {absent or '[]'} do not exist: fix the file list")
    if limit is not None:
        paths = paths[: _check_limit(limit)]
    source = f"'{root}'"
    batches = [
        Batch(k, stop - start, functools.partial(load_batch, recipe, tuple(paths[start:stop]), info, k))
        for k, (start, stop) in enumerate(_ranges(len(paths), batch_size, inputs, source))
    ]
    return CalibrationSet(inputs, batches, source=source)


def from_iterable(feeds: Iterable[Feed] | Feed, inputs: Inputs) -> CalibrationSet:
    """Materialise and validate feeds (each a dict name -> batched array). One dict is taken as one batch."""
    inputs = _as_inputs(inputs)
    if isinstance(feeds, Mapping):
        logger.info("calibration data is a single feed: using it as one batch")
        feeds = [feeds]
    if isinstance(feeds, (str, bytes)) or not isinstance(feeds, Iterable):
        raise UserError(f"calibration data of type {type(feeds).__name__} is not an iterable of feed dicts")
    warned: set[str] = set()
    batches = []
    for k, feed in enumerate(feeds):
        if isinstance(feed, np.ndarray) and len(inputs) == 1:
            feed = {inputs[0].name: feed}
        checked = validate_feed(feed, inputs, k, warned)
        batches.append(Batch(k, feed_samples(checked, inputs), functools.partial(_same, checked), True))
    if not batches:
        raise UserError("the calibration iterable is empty: give at least one feed")
    return CalibrationSet(inputs, batches, source="feeds", warned=warned)


def _random_shape(info: InputInfo, batch: int, dim_values: Mapping[str, int]) -> tuple[int, ...]:
    if info.shape is None:
        raise UserError(
            f"model input '{info.name}' has unknown rank: random data needs a shape; pass real data"
        )
    shape = []
    for axis, dim in enumerate(info.shape):
        key = dim if isinstance(dim, str) else f"{info.name}:{axis}"
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        elif key in dim_values:
            shape.append(int(dim_values[key]))
        else:
            what = f"symbolic dim '{dim}'" if dim else "an unknown dim"
            raise UserError(
                f"model input '{info.name}' axis {axis} is {what}: pass dim_values={{'{key}': size}}"
            )
    return tuple(shape)


def _random_batch(
    inputs: Sequence[InputInfo], seed: int, index: int, size: int, dims: Mapping[str, int]
) -> Feed:
    rng = np.random.default_rng([seed, index])
    feed = {}
    for info in inputs:
        shape = _random_shape(info, size, dims)
        if is_float(info.dtype):
            feed[info.name] = rng.standard_normal(shape, dtype=np.float32).astype(info.dtype)
        elif info.dtype.kind in "iu":
            feed[info.name] = rng.integers(0, 10, shape).astype(info.dtype)
        elif info.dtype.kind == "b":
            feed[info.name] = rng.random(shape) < 0.5
        else:
            raise UserError(f"model input '{info.name}' is {info.dtype}: random data cannot be made for it")
    return feed


def random_like(
    inputs: Inputs, n: int, *, seed: int = 0, batch_size: int = 1, dim_values: Mapping[str, int] | None = None
) -> CalibrationSet:
    """``n`` random samples (standard normal floats, integers in 0..9, fair booleans), for tests.

    Axis 0 is the batch axis (``batch_size``); other symbolic dims come from ``dim_values`` (keyed by the
    symbol, or ``"input:axis"`` for unnamed dims). Batch ``k`` is drawn from ``default_rng([seed, k])``.
    """
    inputs, dims = _as_inputs(inputs), dict(dim_values or {})
    if n < 1:
        raise UserError(f"random_like(n={n}): n must be at least 1")
    ranges = _ranges(n, batch_size, inputs, "random data")
    for info in inputs:
        _random_shape(info, batch_size, dims)  # fail now on missing dim values
    batches = [
        Batch(k, stop - start, functools.partial(_random_batch, inputs, seed, k, stop - start, dims))
        for k, (start, stop) in enumerate(ranges)
    ]
    return CalibrationSet(inputs, batches, source=f"random(seed={seed})")


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"calibration path '{path}' does not exist: pass an .npz/.npy file or a directory of images"
        )
    return path


def load_calibration(
    source: Any, inputs: Inputs, *, recipe: ImageRecipe | str | None = None, batch_size: int = 1,
    limit: int | None = None,
) -> CalibrationSet:
    """Build a :class:`CalibrationSet` from whatever the user gave.

    ``source`` may be a :class:`CalibrationSet` (re-checked against ``inputs``), a path (``.npz``, ``.npy``,
    an image file or a directory of images, which need ``recipe``), one ``(N, ...)`` array for a
    single-input model, or an iterable of feed dicts (or one feed dict, taken as one batch).

    ``batch_size`` applies to files and arrays; already-batched sources keep their batches. ``limit``
    caps the number of samples (the batch crossing it is trimmed).

    Raises:
        UserError: a missing path, an unknown extension, an empty folder, images for a non-image model,
            images without a recipe, or data that do not fit the model.
    """
    inputs = _as_inputs(inputs)
    if limit is not None:
        _check_limit(limit)
    if isinstance(source, (str, os.PathLike)):
        path = _existing(source)
        suffix = path.suffix.lower()
        if path.is_dir() or suffix in IMAGE_EXTENSIONS:
            if recipe is None:
                require_image_model(inputs)
                raise UserError(
                    f"'{path}' holds images, which need an image recipe: pass recipe='imagenet' "
                    f"(presets: {', '.join(PRESETS)}) or e.g. 'resize=256,crop=224,scale=255,mean=...'"
                )
            files = None if path.is_dir() else [path.name]
            root = path if path.is_dir() else path.parent
            return from_image_dir(root, inputs, recipe, batch_size=batch_size, limit=limit, files=files)
        if recipe is not None:
            logger.warning("calibration data '%s' is not images: the image recipe is ignored", path)
        if suffix == ".npz":
            return from_npz(path, inputs, batch_size=batch_size, limit=limit)
        if suffix == ".npy":
            return from_npy(path, inputs, batch_size=batch_size, limit=limit)
        raise UserError(
            f"calibration file '{path}' has an unsupported extension '{suffix}': use .npz (one array per "
            "input), .npy (single input) or a directory of images"
        )
    if isinstance(source, CalibrationSet):
        names, have = [i.name for i in inputs], [i.name for i in source.inputs]
        if sorted(names) != sorted(have):
            raise UserError(
                f"the calibration set feeds inputs {have} but the model inputs are {names}: "
                "rebuild it for this model"
            )
        out = source.rebind(inputs)
    elif isinstance(source, np.ndarray):
        if len(inputs) != 1:
            raise UserError(
                f"one array cannot feed the model inputs {[i.name for i in inputs]}: give a dict per batch"
            )
        lazy = _LazyArray(source.shape, source.dtype, functools.partial(_same, source))
        return _from_arrays({inputs[0].name: lazy}, inputs, batch_size, limit, "the array")
    elif isinstance(source, (Mapping, Iterable)) and not isinstance(source, bytes):
        out = from_iterable(source, inputs)
    else:
        raise UserError(
            f"calibration source of type {type(source).__name__} is not supported: pass a path, an array, "
            "a CalibrationSet or an iterable of feed dicts"
        )
    return out if limit is None else out.first_samples(limit)
