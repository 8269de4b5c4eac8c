"""Calibration tensors of reconstruction blocks, captured in onnxruntime, within a memory budget.

For block k (BRECQ's asymmetric setting) the engine reads:
  * ``inputs_q``: the block inputs computed by the model quantized so far (blocks < k already
    reconstructed and written back), pre-quantizer float values, float32: carried forward block by
    block in torch (:mod:`onnxq.blocks.carry`), or captured here from a prefix of the current model;
  * ``inputs_w`` (optional): the same tensors from that model with every activation Q->DQ pair
    bypassed (:func:`weights_only`): BRECQ's and AdaRound's weight phase sees quantized weights
    upstream but float activations;
  * ``inputs_fp``: the same tensors from the float model (QDrop mixes both; BRECQ's activation
    phase uses them);
  * ``targets``: the block outputs of the float model.
:func:`collect` runs a model's prefix over the calibration feeds and stacks the requested tensors.
Float tensors of the float model are stored as float16 (halving memory; batches are cast back to
float32 when used) unless a value passes float16's range (then float32), integer ones (token ids,
masks) in their own type, and all spill to memory-mapped files in a temporary folder once the budget
is exceeded. Every calibration sample of a tensor must have one shape (the cache is one array per
tensor): calibration batches padded to different sequence lengths are refused with the fix, never
silently dropped.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from onnxq.data.capture import capture, prefix_model
from onnxq.errors import UserError

log = logging.getLogger(__name__)

#: Largest finite float16; a float tensor with a larger magnitude is cached in float32.
_F16_MAX = float(np.finfo(np.float16).max)


class TensorStore:
    """Cache arrays (float16 activations; see :meth:`allocate`) in RAM up to ``budget_bytes`` in total,
    memory-mapped files beyond.

    The budget counts what is allocated since the last :meth:`release`: a caller that is done with
    a block's tensors releases them back to a :meth:`mark`, which also deletes their spill files.
    """

    def __init__(self, budget_bytes: int, spill_dir: str | Path | None = None):
        self.budget = budget_bytes
        self.used = 0
        self._dir = Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.spilled = 0
        self._files: list[Path] = []

    def mark(self) -> tuple[int, int]:
        """The current allocation state, for :meth:`release`."""
        return self.used, len(self._files)

    def release(self, mark: tuple[int, int]) -> None:
        """Forget everything allocated after ``mark``: its bytes leave the budget, its spill files are
        deleted (arrays still mapped stay readable until dropped)."""
        self.used = mark[0]
        for path in self._files[mark[1]:]:
            path.unlink(missing_ok=True)
        del self._files[mark[1]:]

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float16) -> np.ndarray:
        """An array of ``shape``: float16 for activations; an integer or bool tensor (token ids, masks)
        keeps its own ``dtype``, which float16 would round (ids above 2048). A 4-D (N, C, H, W) float
        one is stored channels-last (N, H, W, C in memory, returned as its NCHW view): the torch engine
        trains on that layout (:mod:`onnxq.recon.batching`), which then takes it as is instead of
        keeping a transposed copy."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        order = (0, 2, 3, 1) if len(shape) == 4 and dtype.kind == "f" else tuple(range(len(shape)))
        stored = tuple(shape[i] for i in order)
        if self.used + nbytes <= self.budget:
            self.used += nbytes
            return _logical(np.empty(stored, dtype=dtype), order)
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxq_cache_")
            self._dir = Path(self._tmp.name)
        self.spilled += nbytes
        safe = "".join(c if c.isalnum() else "_" for c in name)
        path = self._dir / f"{safe}_{self.spilled}.{dtype.str[1:]}"
        self._files.append(path)
        return _logical(np.memmap(path, dtype=dtype, mode="w+", shape=stored), order)

    def forget(self, array: np.ndarray) -> None:
        """A caller drops ``array`` (allocated here, or a view of it) for good: a spilled one's file is
        deleted (its map stays readable until dropped), an in-memory one's bytes leave the budget."""
        filename = getattr(array, "filename", None)
        if isinstance(array, np.memmap) and filename:
            path = Path(filename)
            if path in self._files:
                self._files.remove(path)
                path.unlink(missing_ok=True)
        else:
            self.used = max(self.used - array.nbytes, 0)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _logical(stored: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """The view of ``stored`` (axes in ``order``) with the caller's axis order back."""
    return stored.transpose(np.argsort(order)) if order != tuple(range(len(order))) else stored


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ model with every activation quantizer bypassed, weights still quantized.

    An activation quantizer is ``QuantizeLinear -> [Clip ->] DequantizeLinear`` whose input is not
    a constant; consumers of its output read the quantizer's float input instead, and the pair is
    dropped. Weight/bias ``DequantizeLinear`` nodes (constant integer input) are kept, so the copy
    computes ``f(x; W_hat)`` with float activations. A quantizer that ends in a graph output is kept.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = m.graph.node
    constants = {i.name for i in m.graph.initializer}
    constants.update(o for n in nodes if n.op_type == "Constant" for o in n.output)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in m.graph.output}
    bypass: dict[str, str] = {}
    for n in nodes:
        if n.op_type != "DequantizeLinear" or n.output[0] in outputs:
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Clip":
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "QuantizeLinear" and src.input[0] not in constants:
            bypass[n.output[0]] = src.input[0]
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in bypass:
                n.input[i] = bypass[name]
    while True:  # drop the now-unused quantizer nodes
        used = {i for n in nodes for i in n.input} | outputs
        dead = [k for k, n in enumerate(nodes) if n.op_type in ("QuantizeLinear", "Clip", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return m
        for k in reversed(dead):
            del nodes[k]


@dataclass
class BlockData:
    inputs_q: list[np.ndarray]
    inputs_fp: list[np.ndarray]
    targets: list[np.ndarray]
    inputs_w: list[np.ndarray] | None = None

    @property
    def num_samples(self) -> int:
        return int(self.targets[0].shape[0])

    @staticmethod
    def as_torch(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Zero-copy float16 tensors (batches are cast to float32 by the engine)."""
        return [torch.from_numpy(np.asarray(a)) for a in arrays]


def collect(model: onnx.ModelProto | None, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]],
            num_samples: int, store: TensorStore, desc: str, *,
            float_dtype: type = np.float16) -> dict[str, np.ndarray]:
    """Run ``feeds`` through the part of ``model`` that computes ``names`` (:func:`prefix_model`) and
    stack the first ``num_samples`` rows of each tensor (float tensors as ``float_dtype`` in ``store``:
    float16, or float32 past float16's range; integer tensors keep their type). ``model`` None: the
    ``names`` are graph inputs, read from the feeds as they are.

    Raises UserError when a tensor's per-sample shape differs between batches (e.g. token batches
    padded to their own longest sequence) or a tensor has no batch axis."""
    out: dict[str, np.ndarray] = {}
    filled = dict.fromkeys(names, 0)

    def take(name: str, value: np.ndarray) -> None:
        start = filled[name]
        if start >= num_samples:
            return
        value = np.asarray(value)
        if value.ndim == 0:
            raise UserError(f"reconstruction block input {name!r} is a scalar, not a batch of samples: "
                            "exclude the nodes that read it (--exclude) or use --method rtn")
        if name not in out:
            kind = value.dtype.kind
            out[name] = store.allocate(name, (num_samples, *value.shape[1:]),
                                       value.dtype if kind in "iub" else float_dtype)
        if value.shape[1:] != out[name].shape[1:]:
            raise UserError(f"reconstruction caches every calibration sample of {name!r} in one array, but "
                            f"its batches have shapes {tuple(out[name].shape[1:])} and "
                            f"{tuple(value.shape[1:])} per sample: give calibration samples of one shape "
                            "(pad token batches to one sequence length, resize images to one size)")
        rows = min(value.shape[0], num_samples - start)
        part = value[:rows]
        if out[name].dtype == np.float16 and part.size and float(np.max(np.abs(part))) > _F16_MAX:
            # float16 would turn it into inf (an additive attention mask of float32's lowest value):
            # keep this tensor in float32, samples taken so far included
            wide = store.allocate(name, out[name].shape, np.float32)
            wide[:start] = out[name][:start]
            out[name] = wide
        out[name][start:start + rows] = part
        filled[name] = start + rows

    inputs = set(names) if model is None else {i.name for i in model.graph.input}
    if all(t in inputs for t in names):  # graph inputs only: nothing to run
        for feed in feeds:
            for t in names:
                take(t, feed[t])
    else:
        capture(prefix_model(model, names), list(dict.fromkeys(names)), feeds, take, desc=desc)
    n = min(filled.values()) if filled else 0
    return {k: v[:n] for k, v in out.items()}
