"""Layer-wise reconstruction units (AdaRound): one weighted op per block.

Each unit holds a weighted op (Conv, ConvTranspose, Gemm, MatMul with a weight DQ), the
quantizer of its activation input (``t -> Q [-> Clip] -> DQ``), its weight and bias DQs and the
activations fused into its output (Relu, Clip), as AdaRound includes the layer's activation
function f in its objective ||f(W_hat x~) - f(W x)||^2. The unit's input is the pre-quantizer
tensor ``t`` and its output the pre-quantizer output, both present in the float model.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from onnxq.blocks.partition import Block
from onnxq.core.layers import WEIGHT_INPUTS

_FUSED = ("Relu", "Clip")


def _quantizer_chain(tensor: gs.Tensor) -> tuple[list[gs.Node], str]:
    """Nodes of ``t -> Q [-> Clip] -> DQ`` ending at ``tensor``, and ``t`` (itself when unquantized)."""
    chain: list[gs.Node] = []
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "DequantizeLinear":
        return [], tensor.name
    chain.append(node)
    prev = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if prev is not None and prev.op == "Clip":
        chain.append(prev)
        prev = prev.inputs[0].inputs[0] if prev.inputs[0].inputs else None
    if prev is None or prev.op != "QuantizeLinear":
        return [], tensor.name
    chain.append(prev)
    return chain[::-1], prev.inputs[0].name


def _static_dq(tensor: gs.Tensor) -> gs.Node | None:
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
        return node
    return None


def layer_blocks(graph: gs.Graph, *, is_supported: Callable[[gs.Node], bool] = lambda n: True) -> list[Block]:
    blocks: list[Block] = []
    for node in graph.nodes:
        if node.op not in WEIGHT_INPUTS:
            continue
        w_idx, b_idx = WEIGHT_INPUTS[node.op]
        w_dq = _static_dq(node.inputs[w_idx]) if len(node.inputs) > w_idx else None
        if w_dq is None:
            continue
        quant, t_in = _quantizer_chain(node.inputs[0])
        members = [*quant, w_dq]
        if b_idx is not None and len(node.inputs) > b_idx and (b_dq := _static_dq(node.inputs[b_idx])):
            members.append(b_dq)
        members.append(node)
        out = node.outputs[0]
        while len(out.outputs) == 1 and out.outputs[0].op in _FUSED and out.name not in {t.name for t in graph.outputs}:
            members.append(out.outputs[0])
            out = out.outputs[0].outputs[0]
        if not all(is_supported(n) for n in members):
            continue
        blocks.append(Block(index=len(blocks), name=f"layer{len(blocks):02d}:{node.name}", kind="layer",
                            nodes=tuple(n.name for n in members), inputs=(t_in,), outputs=(out.name,),
                            weights=(w_dq.outputs[0].name,), weighted_ops=(node.name,)))
    return blocks
