"""ExportTwoBitPass: the last step of writing a model with 2-bit weights (ternary or 4-level INT2).

Reads ``ctx.two_bit_codes`` (grid -> {code constant -> weight}, written by InsertQDQPass) and the
resolved ``ctx.config.weights.storage``; writes, in the exported model:

  * the code constants of each grid in the model's metadata (``onnxq.ternary_codes`` /
    ``onnxq.int2_codes``), so the ternary check knows which int2 constants may hold -2;
  * for int2 containers this onnxruntime cannot fuse, a ``Cast(to=INT8)`` between each int2 constant
    and its DequantizeLinear, which onnxruntime folds at load (:mod:`onnxq.core.weight_cast`);

and ``ctx.two_bit_export[grid] = {"storage", ["int2_cast"]}`` (how many constants got a Cast). The
function is unchanged: int2 values are a subset of int8's.
"""

from __future__ import annotations

import onnx

from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import ModelPass
from onnxq.core.weight_cast import widen_weights
from onnxq.ternary.check import INT2_METADATA_KEY, METADATA_KEY, mark_two_bit_codes
from onnxq.ternary.export import int2_needs_cast

#: grid -> metadata key of its code constants, in the order they are written.
GRIDS = (("ternary", METADATA_KEY), ("int2", INT2_METADATA_KEY))


class ExportTwoBitPass(ModelPass):
    def call(self, model: onnx.ModelProto, ctx: QuantContext) -> bool:
        modified = False
        for grid, key in GRIDS:
            codes = ctx.two_bit_codes.get(grid)
            if not codes:
                continue
            mark_two_bit_codes(model, codes, key=key)
            storage = ctx.config.weights.storage
            info: dict = {"storage": storage}
            if storage == "int2" and int2_needs_cast():
                info["int2_cast"] = widen_weights(model)
            ctx.two_bit_export[grid] = info
            modified = True
        return modified
