"""Weights read in place from the user's external data file: a large model is never copied whole.

A model whose external data reach :data:`MAPPED_MIN_BYTES` is loaded without them (:func:`attach`):
each external tensor keeps its bytes where they are, and its ``location`` becomes the file's absolute
path. That is the mark of a *mapped* tensor: an ONNX file never holds an absolute location (the
checker and onnxruntime refuse one), so nothing read from disk carries it.

- Reading a mapped tensor (:func:`values`, and ``Constant.values`` in a graph from
  :func:`onnxq.core.graph.to_graph`, through :class:`MappedValues`) maps its bytes read-only
  (``np.memmap``): a weight costs memory only while a pass holds it, and :func:`release` (after every
  pass and before every export) hands untouched maps back, so the graph again holds only the
  reference and the exported model reuses the tensor's record.
- onnxruntime gets the model with the locations made relative to the data's folder and that folder as
  the session option :data:`FOLDER_OPTION` (:func:`ort_bytes`): its session holds one copy of the weights.
- The checker reads a skeleton written beside links to the data files (:func:`checkable_path`).
- Saving copies each mapped tensor's bytes, in chunks, into the output's own data file
  (:func:`write_external`).

So the peak memory of a run is about one copy of the float weights (onnxruntime's, while a session
runs) plus the quantized weights, whatever the model's size.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues

#: Weights from this size on are read in place: external data in their file, in-file weights from a
#: temporary copy (:func:`spill`). ``$ONNXQ_MAPPED_MIN_BYTES`` overrides it (tests run everything mapped).
MAPPED_MIN_BYTES = int(os.environ.get("ONNXQ_MAPPED_MIN_BYTES", 1 << 30))
_SPILL_MIN = 4096  # in-file tensors under this size stay in the proto
FOLDER_OPTION = "session.model_external_initializers_file_folder_path"
_COPY_CHUNK = 64 << 20
_ALIGN = 4096  # onnxruntime maps external data at page-aligned offsets faster
_SMALL = 1 << 20  # mapped tensors up to this size are copied for the checker (shapes and the like)


#: Tensor types whose bytes are not one numpy element per value (sub-byte packing, strings).
PACKED_TYPES = frozenset(getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1",
                                                                "STRING") if hasattr(onnx.TensorProto, t))


def np_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    """The numpy dtype of ``tensor``'s bytes as stored, or None for types numpy has no native form of."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind not in "biuf" or dtype.names is not None or tensor.data_type in PACKED_TYPES \
            or tensor.data_type == onnx.TensorProto.BFLOAT16:
        return None
    return dtype


def _declared_bytes(tensor: onnx.TensorProto, dtype: np.dtype | None) -> int:
    """The bytes ``tensor``'s shape needs in ``dtype`` (one byte a value without one)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * (dtype.itemsize if dtype is not None else 1)


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """``tensor``'s bytes are in the user's file (an absolute location, see the module docstring)."""
    return uses_external_data(tensor) and os.path.isabs(ExternalDataInfo(tensor).location)


def external_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s tensors held in external data (as the file declares them)."""
    total = 0
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            total += _declared_bytes(tensor, np_dtype(tensor))
    return total


def attach(model: onnx.ModelProto, folder: Path) -> list[str]:
    """Mark ``model``'s external initializers (loaded without data, files already checked to lie in
    ``folder``) as mapped; the others (attribute tensors, types numpy lacks) are loaded into memory.

    Returns one line per tensor whose declared bytes do not fit its shape or its file (the caller's error).
    """
    problems: list[str] = []
    for tensor in model.graph.initializer:
        dtype = np_dtype(tensor)
        if not uses_external_data(tensor) or dtype is None:
            continue
        info = ExternalDataInfo(tensor)
        path = (folder / info.location).resolve()
        need = _declared_bytes(tensor, dtype)
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else need
        size = path.stat().st_size
        if length != need or offset + need > size:
            problems.append(f"initializer {tensor.name!r} declares {length} bytes at offset {offset} of "
                            f"{info.location} ({size} bytes) but its shape {list(tensor.dims)} needs {need}")
            continue
        _set_location(tensor, str(path), offset, need)
    if problems:
        return problems
    for tensor in _get_all_tensors(model):  # what is left: attribute tensors, types numpy lacks
        if uses_external_data(tensor) and not is_mapped(tensor):
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return problems


def in_file_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s in-file initializers that :func:`spill` can move (``raw_data`` of a numpy
    type), from their shapes: reading ``raw_data`` copies it."""
    return sum(_declared_bytes(t, dtype) for t in model.graph.initializer
               if t.HasField("raw_data") and (dtype := np_dtype(t)) is not None)


def spill(model: onnx.ModelProto) -> int:
    """Move ``model``'s in-file initializers (numpy types, :data:`_SPILL_MIN` bytes or more) into a file of
    this process's temporary folder and map them from there, so a model loaded from one large file is
    held like one with external data. The folder is removed when the process exits. Returns the bytes
    moved."""
    moved = 0
    path = os.path.join(_spill_folder(), f"weights{next(_SPILLS)}.bin")
    with open(path, "wb") as out:
        for tensor in model.graph.initializer:
            dtype = np_dtype(tensor)
            if not tensor.HasField("raw_data") or dtype is None or _declared_bytes(tensor, dtype) < _SPILL_MIN:
                continue  # a type numpy lacks, or small
            raw = tensor.raw_data  # a copy: read it once
            length = len(raw)
            if length != _declared_bytes(tensor, dtype):
                continue  # a length the load check refuses
            out.seek(-out.tell() % _ALIGN, os.SEEK_CUR)
            offset = out.tell()
            out.write(raw)
            del raw
            tensor.ClearField("raw_data")
            _set_location(tensor, path, offset, length)
            moved += length
    return moved


_SPILLS = itertools.count()


@functools.cache
def _spill_folder() -> str:
    folder = tempfile.mkdtemp(prefix="onnxq-weights-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def values(tensor: onnx.TensorProto) -> np.ndarray:
    """``tensor``'s values: a read-only map of a mapped tensor's bytes, else ``numpy_helper.to_array``."""
    if not is_mapped(tensor):
        return onnx.numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = np_dtype(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    if dtype is None:  # attach never maps such a tensor
        raise ValueError(f"tensor {tensor.name!r}: no numpy type for a mapped tensor of type {tensor.data_type}")
    if not all(shape):
        return np.zeros(shape, dtype)
    return np.memmap(info.location, dtype=dtype, mode="r", offset=int(info.offset or 0), shape=shape)


def drop_pages(array: np.ndarray) -> None:
    """Let the pages of a map from :func:`values` (or of a view of one) leave memory now: they are read
    again from the file when touched. Anything else is left alone. For a weight a pass keeps after use."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def mapped_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if is_mapped(t)]


class MappedValues(LazyValues):
    """graphsurgeon's lazy constant for a mapped tensor: loading maps the bytes (see :func:`values`)."""

    def load(self) -> np.ndarray:
        return values(self.tensor)


def wrap(graph) -> None:
    """Give the mapped constants of a freshly imported graphsurgeon graph :class:`MappedValues`."""
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, LazyValues) and not isinstance(lazy, MappedValues) \
                and isinstance(lazy.tensor, onnx.TensorProto) and is_mapped(lazy.tensor):
            tensor._values = MappedValues(lazy.tensor)


def release(graph) -> int:
    """Hand back every constant whose value is still an untouched map of a mapped tensor (read-only, so
    never changed) to its lazy form: its pages leave memory and an export reuses the record. Returns
    how many were released."""
    released = 0
    for tensor in graph.tensors().values():
        value = getattr(tensor, "_values", None)
        if type(value) is np.memmap and isinstance(value.base, mmap.mmap) and not value.flags.writeable:
            record = onnx.TensorProto(name=tensor.name, dims=value.shape,
                                      data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
            _set_location(record, str(value.filename), int(value.offset), int(value.nbytes))
            tensor._values = MappedValues(record)
            released += 1
    return released


def ort_bytes(model: onnx.ModelProto) -> tuple[bytes, str | None]:
    """``model`` serialized for onnxruntime, with the folder to pass as :data:`FOLDER_OPTION` (None when
    nothing is mapped): mapped locations are made relative to the folder all mapped files share."""
    mapped = mapped_tensors(model)
    if not mapped:
        return model.SerializeToString(), None
    folder = os.path.commonpath([os.path.dirname(ExternalDataInfo(t).location) for t in mapped])
    with _relative(mapped, folder):
        return model.SerializeToString(), folder


def session_config(folder: str | None) -> dict[str, str]:
    """The onnxruntime session config entries for a model from :func:`ort_bytes`."""
    return {FOLDER_OPTION: folder} if folder is not None else {}


@contextlib.contextmanager
def checkable_path(model: onnx.ModelProto) -> Iterator[str]:
    """A path the ONNX checker can read for ``model`` (it refuses absolute locations and links): the
    skeleton in a temporary folder beside a sparse stand-in of each mapped data file, as long as the
    original, holding the real bytes of the small tensors (shapes and the like) and zeros elsewhere."""
    mapped = mapped_tensors(model)
    folder = tempfile.mkdtemp(prefix="onnxq-check-")
    try:
        names: dict[str, str] = {}
        for t in mapped:
            src = ExternalDataInfo(t).location
            if src not in names:
                names[src] = f"data{len(names)}.bin"
                with open(os.path.join(folder, names[src]), "wb") as fh:
                    fh.truncate(os.path.getsize(src))
        for t in mapped:
            info = ExternalDataInfo(t)
            if int(info.length or 0) <= _SMALL:
                with open(os.path.join(folder, names[info.location]), "r+b") as fh:
                    fh.seek(int(info.offset or 0))
                    _copy_range(info.location, int(info.offset or 0), int(info.length or 0), fh)
        path = os.path.join(folder, "model.onnx")
        with _relocated(mapped, lambda t: names[ExternalDataInfo(t).location]):
            onnx.save_model(model, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_external(model: onnx.ModelProto, model_path: str, data_path: Path, data_name: str,
                   threshold: int = 1024) -> None:
    """Save ``model`` at ``model_path`` with its mapped tensors and its in-memory tensors of at least
    ``threshold`` bytes in ``data_path`` (referenced as ``data_name``), copying mapped bytes in chunks.
    ``model`` is unchanged afterwards."""
    saved: list[tuple[onnx.TensorProto, list[tuple[str, str]], bytes | None]] = []
    try:
        with open(data_path, "wb") as out:
            for tensor in _get_all_tensors(model):
                mapped = is_mapped(tensor)
                raw = tensor.raw_data if not mapped and tensor.HasField("raw_data") else None  # a copy: once
                if not mapped and (raw is None or len(raw) < threshold):
                    continue
                out.seek(-out.tell() % _ALIGN, os.SEEK_CUR)
                offset = out.tell()
                entries = [(e.key, e.value) for e in tensor.external_data]
                if raw is None:
                    info = ExternalDataInfo(tensor)
                    _copy_range(info.location, int(info.offset or 0), int(info.length or 0), out)
                    saved.append((tensor, entries, None))
                else:
                    out.write(raw)
                    saved.append((tensor, entries, raw))
                    tensor.ClearField("raw_data")
                _set_location(tensor, data_name, offset, out.tell() - offset)
        onnx.save_model(model, model_path)
    finally:
        for tensor, entries, raw in reversed(saved):
            del tensor.external_data[:]
            for key, value in entries:
                tensor.external_data.add(key=key, value=value)
            if raw is not None:
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = raw


def _copy_range(path: str, offset: int, length: int, out) -> None:
    with open(path, "rb") as src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{path} ends before the {length} bytes at offset {offset}")
            out.write(chunk)
            left -= len(chunk)


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


@contextlib.contextmanager
def _relocated(tensors: list[onnx.TensorProto], location) -> Iterator[None]:
    """Within the block each tensor's location is ``location(tensor)``; restored after."""
    before = [ExternalDataInfo(t).location for t in tensors]
    try:
        for t, new in [(t, location(t)) for t in tensors]:
            next(e for e in t.external_data if e.key == "location").value = new
        yield
    finally:
        for t, old in zip(tensors, before, strict=True):
            next(e for e in t.external_data if e.key == "location").value = old


def _relative(tensors: list[onnx.TensorProto], folder: str):
    return _relocated(tensors, lambda t: os.path.relpath(ExternalDataInfo(t).location, folder))
