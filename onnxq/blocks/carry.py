"""The quantized model's block inputs, carried forward block by block in torch (capture once).

BRECQ's asymmetric setting trains block k on ``x~_k``, its inputs as computed by the model quantized so
far (blocks before k final in the graph). Recomputing ``x~_k`` in onnxruntime from the graph inputs for
every block evaluates ``sum_k |prefix(k)|`` nodes, quadratic in depth, and builds a session per block.
:class:`Carry` keeps instead the *cut*: for every calibration sample, the float32 tensors that blocks
after the current position read. Once block k is final (its codes and step sizes written back), its
fixed module (:func:`onnxq.blocks.build.build_block` with ``rounding=False``: the graph's codes, the
graph's scales) runs on the cut in torch, and its outputs join the cut::

    x~_{k+1} = f_k(x~_k; W_hat_k, s_k)        (the QDQ graph's arithmetic: FakeQuant is
                                               QuantizeLinear -> DequantizeLinear bit for bit)

so each block runs once per carried model instead of once per later block. The carried values equal
onnxruntime's simulation of the QDQ graph (``ORT_ENABLE_BASIC``, the level prefix captures run at)
up to float32 summation order in the convolutions; ``tests/test_carry.py`` compares them block by block.

With ``activations=False`` the carried modules run with every activation quantizer off: the
weights-only model of :func:`onnxq.blocks.cache.weights_only` (the weight phase's inputs).

A block whose inputs are not all in the cut (nodes outside every block lie in between: an unsupported
region) takes them from a prefix run of the current model in onnxruntime (:func:`onnxq.blocks.cache.collect`),
and the carry goes on from there. Cut tensors live in a :class:`~onnxq.blocks.cache.TensorStore` (RAM up to
its budget, memory-mapped files beyond), 4-D ones channels-last as the engine reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from onnxq.blocks.build import build_block
from onnxq.blocks.cache import TensorStore, collect
from onnxq.blocks.partition import Block
from onnxq.core.context import QuantContext

log = logging.getLogger(__name__)

#: Samples per torch forward when a block carries the cut.
CARRY_BATCH = 32


class Carry:
    """The cut of one quantized model (see the module docstring).

    Args:
        blocks: every block of the partition, in topological order (reconstructed or not: the first
            layer and blocks resumed from a checkpoint are carried too).
        feeds: the calibration batches; the cut starts at their graph inputs.
        num_samples: samples carried (the first ones of ``feeds``).
        store: where the cut's arrays live.
        activations: run the carried blocks with their activation quantizers (False: weights only).
    """

    def __init__(self, blocks: Sequence[Block], feeds: Sequence[Mapping[str, np.ndarray]], num_samples: int,
                 store: TensorStore, *, activations: bool = True) -> None:
        self.blocks = list(blocks)
        self.feeds = feeds
        self.num_samples = num_samples
        self.store = store
        self.activations = activations
        self.cut: dict[str, np.ndarray] = {}
        self.carried_blocks = 0
        self.captured_blocks = 0
        if feeds:
            names = list(feeds[0])
            self.cut = collect(None, names, feeds, num_samples, store, "carry", float_dtype=np.float32)

    def inputs(self, block: Block, model: Callable[[], onnx.ModelProto]) -> list[np.ndarray]:
        """``block``'s inputs from the cut, or (when some are missing) from a prefix run of ``model()``,
        the current quantized model (weights-only when ``activations`` is off)."""
        if all(name in self.cut for name in block.inputs):
            return [self.cut[name] for name in block.inputs]
        log.info("%s: inputs not carried (nodes outside the blocks come first): captured in onnxruntime",
                 block.name)
        self.captured_blocks += 1
        got = collect(model(), list(block.inputs), self.feeds, self.num_samples, self.store, "capture q",
                      float_dtype=np.float32)
        self.cut.update(got)
        return [got[name] for name in block.inputs]

    def advance(self, graph: gs.Graph, ctx: QuantContext, block: Block) -> None:
        """Run ``block`` as the graph now holds it on the cut; its outputs join the cut and tensors no
        later block reads leave it. Without every input in the cut, only the outputs are forgotten (the
        next block that needs them captures them). The outputs a later block reads are the only
        tensors that leave a block (partition: single entry, single exit, side outputs listed)."""
        later = self._read_after(block)
        if all(name in self.cut for name in block.inputs):
            outputs = [name for name in block.outputs if name in later]
            if outputs:
                self.cut.update(self._run(graph, ctx, block, outputs))
                self.carried_blocks += 1
        self._keep(later)

    def _keep(self, names: set[str]) -> None:
        """Drop every cut tensor not in ``names`` (its memory goes back to the store)."""
        for name in [k for k in self.cut if k not in names]:
            self.store.forget(self.cut.pop(name))

    def _read_after(self, block: Block) -> set[str]:
        pos = next(i for i, b in enumerate(self.blocks) if b.name == block.name)
        return {name for b in self.blocks[pos + 1:] for name in b.inputs}

    def _run(self, graph: gs.Graph, ctx: QuantContext, block: Block, outputs: list[str]) -> dict[str, np.ndarray]:
        built = build_block(graph, block, ctx, rounding=False, learn_scales=False)
        for fq in built.acts.values():
            fq.enabled = fq.enabled and self.activations
        module = built.module.eval()
        xs = [self.cut[name] for name in block.inputs]
        n = int(xs[0].shape[0])
        out: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for start in range(0, n, CARRY_BATCH):
                batch = [torch.from_numpy(x[start:start + CARRY_BATCH]) for x in xs]
                got = module(*[b.float() if b.is_floating_point() else b for b in batch])
                got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
                values = dict(zip(block.outputs, got, strict=True))
                for name in outputs:
                    value = values[name]
                    if name not in out:
                        dtype = np.float32 if value.is_floating_point() else value.numpy().dtype
                        out[name] = self.store.allocate(name, (n, *value.shape[1:]), dtype)
                    torch.from_numpy(out[name][start:start + CARRY_BATCH]).copy_(value)
        return out

