"""WidenInt4Pass: 4-bit weights that onnxruntime runs on its 8-bit integer kernels.

onnxruntime on CPU fuses no int4 weight: ``DQ(int4 W) -> Conv`` stays a DequantizeLinear and a float
Conv, slower than the float model. For targets whose runtime is onnxruntime on CPU this pass reads every
int4 (uint4) weight constant through a ``Cast`` to int8 (uint8) that onnxruntime folds at load
(:func:`onnxq.core.weight_cast.widen_weights`): the file keeps 4 bits a weight, the function is
unchanged, and the layers run as QLinearConv / QLinearMatMul / QGemm (4-bit codes cannot saturate
the 8-bit kernels); a weight with zero-points is read as ``q - z`` with zero-point 0, since
QLinearConv runs weight zero-points on a slow path. 2-bit grids stored in int4 containers are left to
ExportTwoBitPass. Writes ``report["int4_cast_to_int8"]`` (the constants read through a Cast).
"""

from __future__ import annotations

import onnx

from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import ModelPass
from onnxq.core.weight_cast import widen_weights

_INT4 = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


class WidenInt4Pass(ModelPass):
    def call(self, model: onnx.ModelProto, ctx: QuantContext) -> bool:
        if ctx.target is None or ctx.target.runtime != "ort-cpu":
            return False
        two_bit = frozenset(name for codes in ctx.two_bit_codes.values() for name in codes)
        widened = widen_weights(model, _INT4, skip=two_bit)  # 2-bit grids in int4 containers: ExportTwoBitPass
        if widened:
            ctx.report["int4_cast_to_int8"] = widened
        return bool(widened)
