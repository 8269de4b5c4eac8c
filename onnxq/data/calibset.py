"""Calibration feeds: :class:`InputInfo`, feed validation and :class:`CalibrationSet` (loaders: ``calib``).

A :class:`CalibrationSet` is a re-iterable sequence of *batches*; batch ``k`` is a feed dict
``{input name: array with a leading batch axis}`` produced only when asked for, by a zero-argument loader
(files are memory-mapped or read per batch, so memory stays bounded by one batch). Every feed is validated
when produced:

* names: exactly the model's inputs;
* shape: same rank; static dims equal; symbolic dims free, but one symbol has one value across a feed;
* dtype: exact, or a safe cast (float16 -> float32, int32 -> int64, ...), or float64 -> float32 (warned
  once per set); anything else is refused;
* values: floating data must be finite (no NaN / Inf).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, overload

import numpy as np
import onnx
from onnx import helper

from onnxq.errors import UserError

logger = logging.getLogger(__name__)

Dim = Union[int, str, None]
Feed = Mapping[str, Any]


@dataclass(frozen=True)
class InputInfo:
    """One graph input.

    ``shape`` holds ints (static dims), str (symbolic dims) or None (unknown dims); ``shape=None`` means
    the rank is unknown. ``dtype`` is the numpy dtype of the ONNX element type.
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    def describe(self) -> str:
        """The shape as text, e.g. ``(N, 3, 224, 224)`` (``?`` for unknown dims)."""
        if self.shape is None:
            return "(unknown rank)"
        dims = ["?" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def model_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """The graph inputs that are not initializers, in graph order."""
    graph = model.graph
    initialized = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    out = []
    for value in graph.input:
        if value.name in initialized:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UserError(
                f"model input '{value.name}' is a {kind}, not a tensor: only tensor inputs can be calibrated"
            )
        tensor = value.type.tensor_type
        if tensor.elem_type == onnx.TensorProto.UNDEFINED:
            raise UserError(
                f"model input '{value.name}' has no element type: fix the model's input declaration"
            )
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(
                # A negative dim_value (Paddle writes -1 for the batch) is a dynamic dim, and a
                # dim_param of "?" (Paddle again) is anonymous, not one shared symbol.
                (d.dim_value if d.dim_value > 0 else None) if d.HasField("dim_value")
                else (d.dim_param if d.dim_param not in ("", "?") else None)
                for d in tensor.shape.dim
            )
        out.append(InputInfo(value.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return out


def is_float(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes ones (bfloat16, float8...)."""
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def _cast(info: InputInfo, array: np.ndarray, index: int, warned: set[str]) -> np.ndarray:
    got, want = array.dtype, info.dtype
    if got == want:
        return array
    ok = (got.kind == want.kind == "f" or (got.kind in "iu" and want.kind in "iu")) and np.can_cast(got, want)
    if ok:
        return array.astype(want)
    if got == np.float64 and want == np.float32:
        if info.name not in warned:
            warned.add(info.name)
            logger.warning("calibration input '%s' is float64, the model wants float32: casting", info.name)
        with np.errstate(over="ignore"):  # overflow is reported by validate_feed
            return array.astype(want)
    raise UserError(
        f"calibration input '{info.name}' batch {index} has dtype {got} but the model wants {want}: "
        f"convert it with .astype(np.{want.name})"
    )


def _check_shape(info: InputInfo, array: np.ndarray, index: int, bound: dict[str, tuple[int, str]]) -> None:
    if info.shape is None:
        return
    head = f"calibration input '{info.name}' batch {index} has shape {array.shape}"
    if array.ndim != len(info.shape):
        fix = {len(info.shape) - 1: "add the leading batch axis", len(info.shape) + 1: "drop the extra axis"}
        raise UserError(
            f"{head} (rank {array.ndim}) but the model wants {info.describe()} (rank {len(info.shape)}): "
            f"{fix.get(array.ndim, 'reshape the data')}"
        )
    for axis, (want, have) in enumerate(zip(info.shape, array.shape)):
        if isinstance(want, int) and want != have:
            fix = f"use batch_size={want}" if axis == 0 else "resize or reshape the data"
            raise UserError(
                f"{head} but the model wants {info.describe()}: axis {axis} is {have}, expected {want}: {fix}"
            )
        if isinstance(want, str):
            value, owner = bound.setdefault(want, (have, info.name))
            if value != have:
                raise UserError(
                    f"{head}: symbolic dim '{want}' (axis {axis}) is {have} but it is {value} in input "
                    f"'{owner}' of the same batch: make the '{want}' dims agree"
                )


def validate_feed(
    feed: Feed, inputs: Sequence[InputInfo], index: int, warned: set[str] | None = None
) -> dict[str, np.ndarray]:
    """Check one feed against the model inputs (see module docstring) and return it cast and contiguous.

    Args:
        feed: input name -> array (with the batch axis).
        inputs: the model inputs.
        index: the batch index named in error messages.
        warned: names already warned about a float64 -> float32 cast (updated in place).

    Raises:
        UserError: one line naming the input, the batch index, what was expected and what was given.
    """
    warned = set() if warned is None else warned
    if not isinstance(feed, Mapping):
        raise UserError(
            f"calibration batch {index} is a {type(feed).__name__}, not a dict of input name -> array: "
            f"give feeds like {{'{inputs[0].name}': array}}"
        )
    expected, got = [i.name for i in inputs], [str(k) for k in feed]
    missing = [n for n in expected if n not in feed]
    extra = [n for n in got if n not in expected]
    if missing or extra:
        what = f"is missing input(s) {missing}" if missing else f"has unknown input(s) {extra}"
        raise UserError(f"calibration batch {index} {what}: the model expects {expected}, got {got}")
    bound: dict[str, tuple[int, str]] = {}
    out = {}
    for info in inputs:
        array = np.asarray(feed[info.name])
        _check_shape(info, array, index, bound)
        if is_float(array.dtype):
            probe = array.astype(np.float32) if array.dtype.kind == "V" else array
            if not np.isfinite(probe).all():
                bad = "NaN" if np.isnan(probe).any() else "Inf"
                raise UserError(
                    f"calibration input '{info.name}' batch {index} contains {bad}: clean the data"
                )
        cast = _cast(info, array, index, warned)
        if cast is not array and is_float(cast.dtype) and np.isinf(cast.astype(np.float32)).any():
            raise UserError(
                f"calibration input '{info.name}' batch {index} overflows {info.dtype} when cast from "
                f"{array.dtype}: rescale the data"
            )
        out[info.name] = np.ascontiguousarray(cast)
    return out


def feed_samples(feed: Mapping[str, np.ndarray], inputs: Sequence[InputInfo]) -> int:
    """Samples in a feed: the leading dim of the first input that has one (1 if all are scalars)."""
    for info in inputs:
        array = feed[info.name]
        if array.ndim >= 1:
            return int(array.shape[0])
    return 1


@dataclass(frozen=True)
class Batch:
    """One batch of a :class:`CalibrationSet`; ``load()`` returns its feed (validated only if ``checked``)."""

    index: int  # position in the original source, used in messages
    size: int  # samples
    load: Callable[[], Feed]
    checked: bool = False  # True: already validated against the set's inputs


def _trimmed(load: Callable[[], Feed], keep: int) -> Feed:
    return {k: (np.asarray(v)[:keep] if np.ndim(v) else v) for k, v in load().items()}


class CalibrationSet(Sequence[dict[str, np.ndarray]]):
    """Re-iterable, lazily loaded batches of model feeds (name -> array with a leading batch axis).

    ``cs[k]`` loads and validates batch ``k`` on every call (nothing is cached, so memory stays bounded);
    ``cs[a:b]`` is another :class:`CalibrationSet`. Iterating twice gives the same data.
    """

    def __init__(
        self, inputs: Sequence[InputInfo], batches: Sequence[Batch], *, source: str = "calibration data",
        warned: set[str] | None = None,
    ) -> None:
        self._inputs = tuple(inputs)
        self._batches = tuple(batches)
        self._source = source
        self._warned = set() if warned is None else warned  # shared with slices: warn once per set

    @property
    def inputs(self) -> tuple[InputInfo, ...]:
        """The model inputs every feed is validated against."""
        return self._inputs

    @property
    def source(self) -> str:
        """Where the data come from (a path or a description)."""
        return self._source

    @property
    def num_samples(self) -> int:
        """Total samples over all batches (known without loading any)."""
        return sum(b.size for b in self._batches)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Samples in each batch."""
        return tuple(b.size for b in self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    @overload
    def __getitem__(self, key: int) -> dict[str, np.ndarray]: ...

    @overload
    def __getitem__(self, key: slice) -> CalibrationSet: ...

    def __getitem__(self, key: int | slice) -> dict[str, np.ndarray] | CalibrationSet:
        if isinstance(key, slice):
            return self._with(self._batches[key])
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"CalibrationSet indices must be int or slice, not {type(key).__name__}")
        batch = self._batches[operator.index(key)]
        feed = batch.load()
        if batch.checked:
            return dict(feed)
        return validate_feed(feed, self._inputs, batch.index, self._warned)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(len(self)):
            yield self[k]

    def __repr__(self) -> str:
        names = [i.name for i in self._inputs]
        return (
            f"CalibrationSet({len(self)} batches, {self.num_samples} samples, inputs={names}, "
            f"source={self._source})"
        )

    def split(self, holdout: int) -> tuple[CalibrationSet, CalibrationSet]:
        """Return ``(calibration, holdout)``: the last ``holdout`` batches are set aside."""
        if not 0 <= holdout < len(self):
            raise UserError(
                f"holdout={holdout} must be at least 0 and leave calibration batches, but the set has "
                f"{len(self)} batches: lower holdout or add data"
            )
        cut = len(self) - holdout
        return self[:cut], self[cut:]

    def take(self, n_batches: int) -> CalibrationSet:
        """The first ``n_batches`` batches (all of them if there are fewer)."""
        if n_batches < 0:
            raise UserError(f"take({n_batches}): the number of batches must be >= 0")
        if n_batches > len(self):
            logger.info("take(%d): the set has only %d batches; using all of them", n_batches, len(self))
        return self[:n_batches]

    def _with(self, batches: Sequence[Batch]) -> CalibrationSet:
        return CalibrationSet(self._inputs, batches, source=self._source, warned=self._warned)

    def rebind(self, inputs: Sequence[InputInfo]) -> CalibrationSet:
        """The same batches validated against other inputs (already-checked feeds are checked again)."""
        if tuple(inputs) == self._inputs:
            return self
        batches = [dataclasses.replace(b, checked=False) for b in self._batches]
        return CalibrationSet(inputs, batches, source=self._source, warned=self._warned)

    def leading_batches(self, samples: int) -> int:
        """How many leading whole batches hold at least ``samples`` samples (all batches if fewer)."""
        total = 0
        for i, size in enumerate(self.batch_sizes):
            if total >= samples:
                return i
            total += size
        return len(self)

    def first_samples(self, limit: int) -> CalibrationSet:
        """Keep the first ``limit`` samples, trimming the batch that crosses the limit."""
        kept, total = [], 0
        for batch in self._batches:
            if total >= limit:
                break
            if total + batch.size > limit:
                keep = limit - total
                load = functools.partial(_trimmed, batch.load, keep)
                batch = dataclasses.replace(batch, size=keep, load=load)
            kept.append(batch)
            total += batch.size
        return self._with(kept)
