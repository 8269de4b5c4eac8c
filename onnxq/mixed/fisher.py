"""BRECQ's Fisher-based sensitivity of one layer at one weight width (the ``fisher`` measure).

BRECQ approximates the task-loss change of a perturbation ``dz`` of a layer (block) output ``z``
by a second-order expansion with the diagonal Fisher information as the Hessian:

    dL ~ 1/2 sum_k F_k dz_k^2,        F_k = E_x E_{y ~ p(y|x)} (d log p(y|x) / d z_k)^2

Label-free, the natural loss is ``KL(p_fp || p_q)``: it is 0 with zero gradient at ``dz = 0`` and
its Hessian there is exactly this Fisher (with ``y`` drawn from the float model's own prediction),
so ``1/2 sum_k F_k dz_k^2`` is the second-order KL increase. Here, per layer ``l`` and width ``b``:

    dz(x) = op(x_l, W_b - W) + (bias_b - bias)      (x_l: the layer's float input)
    fisher(l, b) = 1/2 mean_x sum_k g_k(x)^2 dz_k(x)^2,   g = d CE(f(x), y) / d z,  y ~ softmax(f(x))

with one sampled label per sample (an unbiased estimate of ``F_k(x)``; the per-sample gradients come
out of one backward pass of the summed loss because samples do not interact in a folded graph).
Outputs that are not ``(N, C)`` logits use the Gaussian likelihood's Fisher: ``g = J^T eps`` with
``eps ~ N(0, I)`` (``E[g^2]`` is the Gauss-Newton diagonal). Differences from BRECQ, on purpose: the
measure is per layer (one layer perturbed, the table's convention), ``dz`` uses float inputs (the
table's one-layer-at-a-time setting), and BRECQ's ``+1`` damping, a reconstruction-stability
device, is left out so that the measure scales like a loss. The float graph runs in torch
(:mod:`onnxq.torchify`); ``W_b`` are the same dequantized weights the output measures use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import UserError

log = logging.getLogger(__name__)

#: Samples per forward/backward pass (bounds the memory of the cached layer inputs and gradients).
CHUNK = 8


def fisher_sensitivity(reference: onnx.ModelProto, layers: Sequence, weights: Mapping[int, Mapping[str, tuple]],
                       holdout, *, seed: int = 0) -> dict[str, dict[int, float]]:
    """``fisher(l, b)`` for every candidate layer and width in ``weights`` (see the module docstring).

    Args:
        reference: the float model after the float phase (names match the layer names).
        layers: candidate :class:`~onnxq.mixed.sensitivity.LayerInfo` objects.
        weights: width -> layer name -> (dequantized weight, dequantized bias or None).
        holdout: iterable of feeds.
        seed: seed of the sampled labels / Gaussian probes.
    """
    import torch

    from onnxq.core.layers import WEIGHT_INPUTS, node_key
    from onnxq.torchify import OPS, BlockModule, node_attrs, supported

    graph = gs.import_onnx(reference)
    graph.toposort()
    bad = [f"{n.name} ({n.op}): {supported(n)}" for n in graph.nodes if supported(n) is not None]
    if bad:
        raise UserError(f"the Fisher measure runs the float model in torch, which cannot run {bad[0]}: "
                        "use another measure (mse, cosine)")
    nodes = {node_key(n): n for n in graph.nodes}
    names = [info.name for info in layers]
    ins = [nodes[n].inputs[0].name for n in names]
    outs = [nodes[n].outputs[0].name for n in names]
    graph_in = [t.name for t in graph.inputs]
    graph_out = [t.name for t in graph.outputs]
    module = BlockModule(graph.nodes, graph_in, graph_out + ins + outs)
    module.eval()
    deltas: dict[str, dict[int, tuple]] = {}
    for name in names:
        node = nodes[name]
        w_idx, b_idx = WEIGHT_INPUTS[node.op]
        w = np.asarray(node.inputs[w_idx].values, dtype=np.float32)
        has_b = b_idx is not None and len(node.inputs) > b_idx and isinstance(node.inputs[b_idx], gs.Constant)
        b = np.asarray(node.inputs[b_idx].values, dtype=np.float32) if has_b else None
        deltas[name] = {}
        for bits, per_layer in weights.items():
            wq, bq = per_layer[name]
            db = None if bq is None else bq - (b if b is not None else 0.0)
            deltas[name][bits] = (torch.from_numpy(wq - w), None if db is None else torch.from_numpy(db))
    attrs = {name: node_attrs(nodes[name]) for name in names}
    gen = torch.Generator().manual_seed(seed)
    total = {name: {bits: 0.0 for bits in weights} for name in names}
    count = 0
    for feed in holdout:
        n = next(iter(feed.values())).shape[0]
        for start in range(0, n, CHUNK):
            xs = [torch.from_numpy(np.ascontiguousarray(np.asarray(feed[k])[start:start + CHUNK]))
                  for k in graph_in]
            with torch.enable_grad():
                # a leaf that needs a gradient makes every layer output part of the autograd graph
                xs = [x.requires_grad_(True) if x.is_floating_point() else x for x in xs]
                result = module(*xs)
                outputs, acts, zs = (result[:len(graph_out)], result[len(graph_out):len(graph_out) + len(names)],
                                     result[len(graph_out) + len(names):])
                loss = sum(_probe_loss(o, gen) for o in outputs)
                grads = torch.autograd.grad(loss, list(zs), allow_unused=True)
            with torch.no_grad():
                for name, x, grad in zip(names, acts, grads):
                    if grad is None:
                        continue
                    g2 = grad.detach() ** 2
                    node = nodes[name]
                    for bits, (dw, db) in deltas[name].items():
                        args = [x.detach(), dw] + ([db] if db is not None and node.op != "MatMul" else [])
                        dz = OPS[node.op](attrs[name], args)[0]
                        if db is not None and node.op == "MatMul":
                            dz = dz + db
                        total[name][bits] += 0.5 * float(torch.sum(g2 * dz**2))
            count += int(xs[0].shape[0])
    return {name: {bits: v / max(1, count) for bits, v in per.items()} for name, per in total.items()}


def _probe_loss(out, gen):
    """Sampled-label cross-entropy for (N, C) logits, else a Gaussian probe ``sum(eps * y)`` (summed
    over the batch, so each sample's gradient is its own)."""
    import torch
    import torch.nn.functional as F

    out = out.float()
    if out.ndim == 2 and out.shape[1] > 1:
        probs = torch.softmax(out.detach(), dim=1)
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return F.cross_entropy(out, y, reduction="sum")
    eps = torch.randn(out.shape, generator=gen)
    return torch.sum(eps * out)
