"""ONNX nodes executed in torch: a block of a QDQ ONNX model as a differentiable ``nn.Module``.

    from onnxq.torchify import BlockModule, supported
    if all(supported(n) is None for n in nodes):
        block = BlockModule(nodes, ["x"], ["y"], weight_quantizers={...}, act_quantizers={...})
        (y,) = block(x)

The op table (:data:`OPS`) is our own; op families live in ``ops_nn``, ``ops_elementwise``,
``ops_shape`` and ``ops_quant`` and register themselves with :func:`register`.
"""

from __future__ import annotations

from onnxq.torchify import ops_elementwise, ops_nn, ops_quant, ops_shape  # noqa: F401  (fill OPS)
from onnxq.torchify.module import BlockModule, block_from_model, constant_tensor
from onnxq.torchify.ops_quant import dequantize_linear, quantize_linear, round_half_even_ste
from onnxq.torchify.registry import OPS, OpFn, node_attrs, register, supported

__all__ = [
    "OPS",
    "BlockModule",
    "OpFn",
    "block_from_model",
    "constant_tensor",
    "dequantize_linear",
    "node_attrs",
    "quantize_linear",
    "register",
    "round_half_even_ste",
    "supported",
]
