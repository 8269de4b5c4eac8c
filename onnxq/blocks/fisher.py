"""Diagonal-Fisher weights of a block's output error (BRECQ's Fisher-weighted reconstruction).

BRECQ approximates the task-loss change caused by a perturbation ``dz`` of block output ``z`` by
the diagonal of the Fisher information, estimated with squared gradients:

    dL ~ sum_i (g_i * dz_i)^2,      g = d KL(p_fp || p_q) / d z

where ``p_fp = softmax(f_fp(x))`` are the float model's output probabilities and ``p_q`` those of the
model quantized so far when block output ``z`` continues through the rest of the quantized network
(the *tail*). As in BRECQ's reference, the KL is averaged over mini-batches of 32 samples
(``batchmean``), so ``g`` carries a ``1/32`` factor, and the engine weights the error with
``(|g| + 1)^2`` (damping 1, :mod:`onnxq.recon.loss`).

The tail runs in torch: every node downstream of the block outputs (in the QDQ graph, the outputs'
own Q/DQ pairs included), with activation Q->DQ pairs as straight-through :class:`FakeQuant` modules
so the gradient passes the rounding, and weights at their current (round-to-nearest or already
reconstructed) codes. Softmax is taken over axis 1 of every graph output, so the measure is meant for
classification logits ``(N, C)``; other outputs raise a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from onnxq.blocks.partition import Block
from onnxq.core.context import QuantContext
from onnxq.errors import UserError
from onnxq.recon.fake_quant import FakeQuant
from onnxq.torchify import BlockModule, supported

log = logging.getLogger(__name__)

FISHER_BATCH = 32  # BRECQ's reference computes the gradients on mini-batches of 32 (batchmean KL)


def tail_nodes(graph: gs.Graph, block: Block) -> list[gs.Node] | None:
    """Nodes downstream of ``block.outputs`` in topological order, or None when some of them also
    need a tensor that is neither a constant nor computed from the block outputs."""
    reached = set(block.outputs)
    nodes: list[gs.Node] = []
    for node in graph.nodes:  # topologically sorted (CleanupPass runs before reconstruction)
        names = [t.name for t in node.inputs if t is not None and t.name]
        if not any(n in reached for n in names):
            continue
        for t in node.inputs:
            if t is None or not t.name or t.name in reached or isinstance(t, gs.Constant):
                continue
            if t.inputs and _constant_only(t.inputs[0]):
                continue  # produced by a constant-only node (e.g. Constant, a DQ of constants)
            return None
        nodes.append(node)
        reached.update(t.name for t in node.outputs)
    return nodes


def _constant_only(node: gs.Node) -> bool:
    return all(isinstance(i, gs.Constant) for i in node.inputs if i is not None)


def _with_constant_producers(graph: gs.Graph, nodes: list[gs.Node]) -> list[gs.Node]:
    """Add the constant-only producers (weight DQs of the tail) in front, in graph order."""
    have = {id(n) for n in nodes}
    extra: list[gs.Node] = []
    for node in nodes:
        for t in node.inputs:
            if (t is not None and not isinstance(t, gs.Constant) and t.inputs and id(t.inputs[0]) not in have
                    and _constant_only(t.inputs[0])):
                have.add(id(t.inputs[0]))
                extra.append(t.inputs[0])
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    return sorted(extra, key=lambda n: order[id(n)]) + nodes


def build_tail(graph: gs.Graph, block: Block, ctx: QuantContext) -> tuple[bool, BlockModule | None]:
    """The rest of the quantized network after ``block`` as a torch module.

    Returns ``(True, module)``, ``(True, None)`` when the block outputs are the graph outputs, or
    ``(False, None)`` when the tail needs other inputs or an op the torch engine lacks."""
    outputs = [t.name for t in graph.outputs]
    nodes = tail_nodes(graph, block)
    if nodes is None or any(supported(n) is not None for n in nodes):
        return False, None
    if not nodes:
        return set(outputs) <= set(block.outputs), None
    nodes = _with_constant_producers(graph, nodes)
    acts = {}
    for node in nodes:
        if node.op == "QuantizeLinear" and node.inputs[0].name in ctx.qparams:
            qp = ctx.qparams[node.inputs[0].name]
            acts[node.inputs[0].name] = FakeQuant(qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax)
    module = BlockModule(nodes, block.outputs, outputs, act_quantizers=acts)
    module.eval()
    return True, module


def check_logit_outputs(graph: gs.Graph) -> None:
    """Fisher weighting needs classification logits: every graph output of rank 2."""
    for t in graph.outputs:
        if t.shape is not None and len(t.shape) != 2:
            raise UserError(f"--fisher needs classification logits of shape (N, C), but output {t.name!r} has "
                            f"rank {len(t.shape)}: drop --fisher for this model")


def fisher_gradients(tail: BlockModule | None, z_q: Sequence[torch.Tensor], logits_fp: Sequence[np.ndarray]
                     ) -> list[np.ndarray]:
    """``g = d KL(softmax(fp) || softmax(q)) / d z`` per sample (batchmean over 32), as float32 arrays
    (the gradients of early blocks are often below float16's smallest normal number).

    Args:
        tail: the quantized network after the block (None when the block outputs are the graph outputs).
        z_q: the block outputs of the model quantized so far, ``(N, ...)`` each.
        logits_fp: the float model's graph outputs for the same N samples.
    """
    n = int(z_q[0].shape[0])
    grads = [np.empty(tuple(z.shape), dtype=np.float32) for z in z_q]
    for start in range(0, n, FISHER_BATCH):
        stop = min(start + FISHER_BATCH, n)
        zs = [z[start:stop].float().detach().requires_grad_(True) for z in z_q]
        with torch.enable_grad():
            out = tail(*zs) if tail is not None else tuple(zs)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            loss = sum(F.kl_div(F.log_softmax(q, dim=1), F.softmax(torch.from_numpy(np.asarray(
                fp[start:stop], dtype=np.float32)), dim=1), reduction="batchmean")
                for q, fp in zip(out, logits_fp, strict=True))
            gs_ = torch.autograd.grad(loss, zs, allow_unused=True)
        for k, g in enumerate(gs_):
            grads[k][start:stop] = 0.0 if g is None else g.numpy()
    return grads
