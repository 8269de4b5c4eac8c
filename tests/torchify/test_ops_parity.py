"""Every torchify op against onnxruntime: one-node models, random seeded inputs.

A case lists the op, its attributes and its inputs: a shape (a random float graph input), an
array (a constant initializer) or None (an omitted optional input). Floats must agree to
rtol = atol = 1e-5; nearest Resize, MaxPool, shape ops and Q/DQ must agree exactly; AveragePool
to atol 1e-6 (onnxruntime's MLAS kernel sums a window in its own order: ~2 ulp apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from onnxq.torchify import OPS, block_from_model, supported

F32 = TP.FLOAT
_rng = np.random.default_rng(1234)


def _w(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@dataclass(frozen=True)
class Case:
    op: str
    inputs: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13
    exact: bool = False
    atol: float = 1e-5                  # rtol is 1e-5
    outputs: tuple[int, ...] = (F32,)   # ONNX element type of each output
    positive: bool = False              # random inputs in [0.5, 2.5)
    feed: np.ndarray | None = None      # explicit value of the first graph input


X4 = (2, 3, 8, 8)
# Quantization test data: exact ties (k + 0.5) * s, saturating values, negatives.
_QX = (np.arange(-40, 40, dtype=np.float32).reshape(2, 4, 10) * 0.25 + 0.125) * np.float32(0.1)
_QX[0, 0, :3] = [1e4, -1e4, 0.05]

CASES: dict[str, Case] = {
    # ---- Conv
    "conv_pads1_bias": Case("Conv", (X4, _w(4, 3, 3, 3), _w(4)), {"pads": [1, 1, 1, 1]}),
    "conv_stride2_asym_pads": Case("Conv", (X4, _w(5, 3, 3, 3)), {"strides": [2, 2], "pads": [0, 1, 1, 0]}),
    "conv_dilation2": Case("Conv", (X4, _w(4, 3, 3, 3), _w(4)), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "conv_groups2": Case("Conv", ((1, 4, 7, 7), _w(6, 2, 3, 3)), {"group": 2, "pads": [1, 1, 1, 1]}),
    "conv_depthwise_same_upper_s2": Case("Conv", ((1, 4, 8, 8), _w(4, 1, 3, 3), _w(4)),
                                         {"group": 4, "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "conv_same_lower_k4_s2":
        Case("Conv", ((1, 2, 7, 7), _w(3, 2, 4, 4)), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "conv_valid_1x3": Case("Conv", (X4, _w(2, 3, 1, 3)), {"strides": [1, 2], "auto_pad": "VALID"}),
    "conv1d": Case("Conv", ((2, 3, 10), _w(4, 3, 3), _w(4)), {"pads": [1, 2]}),
    "conv_weight_input": Case("Conv", (X4, (4, 3, 1, 1))),
    # ---- ConvTranspose
    "convT_s2_pads_outpad": Case("ConvTranspose", ((1, 4, 5, 5), _w(4, 3, 3, 3), _w(3)),
                                 {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "convT_group2": Case("ConvTranspose", ((1, 4, 5, 5), _w(4, 2, 3, 3)), {"strides": [2, 2], "group": 2}),
    "convT_asym_pads_dilated": Case("ConvTranspose", ((1, 2, 4, 4), _w(2, 3, 3, 3)),
                                    {"dilations": [2, 2], "pads": [0, 1, 1, 0]}),
    "convT_output_shape": Case("ConvTranspose", ((1, 2, 5, 5), _w(2, 3, 3, 3), _w(3)),
                               {"strides": [2, 2], "output_shape": [10, 10]}),
    "convT_same_upper":
        Case("ConvTranspose", ((1, 2, 5, 5), _w(2, 3, 3, 3)), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "convT_same_lower":
        Case("ConvTranspose", ((1, 2, 5, 5), _w(2, 3, 3, 3)), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "convT_1d": Case("ConvTranspose", ((2, 3, 6), _w(3, 2, 4)), {"strides": [3], "pads": [1, 0]}),
    # ---- Gemm / MatMul
    "gemm_plain": Case("Gemm", ((4, 6), _w(6, 5))),
    "gemm_transB_bias_alpha_beta":
        Case("Gemm", ((4, 6), _w(5, 6), _w(5)), {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    "gemm_transA_matrix_c": Case("Gemm", ((6, 4), _w(6, 5), _w(4, 5)), {"transA": 1}),
    "gemm_transAB": Case("Gemm", ((6, 4), (5, 6), _w(1, 5)), {"transA": 1, "transB": 1, "alpha": 1.5}),
    "matmul_2d": Case("MatMul", ((4, 6), _w(6, 3))),
    "matmul_batched_3d_2d": Case("MatMul", ((2, 4, 6), _w(6, 3))),
    "matmul_4d": Case("MatMul", ((2, 3, 4, 6), (2, 3, 6, 5))),
    # ---- pools
    "global_avg_pool": Case("GlobalAveragePool", ((2, 3, 5, 7),)),
    "global_max_pool": Case("GlobalMaxPool", ((2, 3, 5, 7),), exact=True),
    "avgpool_k3_pad1_excl":
        Case("AveragePool", (X4,), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, atol=1e-6),
    "avgpool_k3_pad1_incl": Case("AveragePool", (X4,), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                        "count_include_pad": 1}, atol=1e-6),
    "avgpool_ceil_s2": Case("AveragePool", ((1, 2, 7, 7),), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                             "ceil_mode": 1}, atol=1e-6),
    "avgpool_ceil_pads_incl": Case("AveragePool", ((1, 2, 8, 8),), {"kernel_shape": [3, 3], "strides": [2, 2],
                                   "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}, atol=1e-6),
    "avgpool_ceil_drop_last": Case("AveragePool", ((1, 1, 5, 5),), {"kernel_shape": [2, 2], "strides": [3, 3],
                                   "pads": [0, 0, 1, 1], "ceil_mode": 1}, atol=1e-6),
    "avgpool_same_upper_s2": Case("AveragePool", ((1, 2, 7, 7),), {"kernel_shape": [3, 3], "strides": [2, 2],
                                                                   "auto_pad": "SAME_UPPER"}, atol=1e-6),
    "avgpool_asym_pads": Case("AveragePool", (X4,), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                     "pads": [0, 0, 1, 1]}, atol=1e-6),
    "avgpool_dilated":
        Case("AveragePool", (X4,), {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
             opset=19, atol=1e-6),
    "avgpool_1d": Case("AveragePool", ((2, 3, 9),), {"kernel_shape": [3], "strides": [2]}, atol=1e-6),
    "maxpool_k3_s2_pad1":
        Case("MaxPool", (X4,), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
             exact=True),
    "maxpool_ceil":
        Case("MaxPool", ((1, 2, 7, 7),), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
             exact=True),
    "maxpool_dilated":
        Case("MaxPool", (X4,), {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 0, 0, 1]},
             exact=True),
    "maxpool_same_lower": Case("MaxPool", ((1, 2, 7, 7),), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                            "auto_pad": "SAME_LOWER"}, exact=True),
    "maxpool_1d":
        Case("MaxPool", ((2, 3, 9),), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, exact=True),
    # ---- reductions
    "reduce_mean_attr_axes": Case("ReduceMean", ((2, 3, 4, 5),), {"axes": [2, 3]}),
    "reduce_mean_input_axes_opset18": Case("ReduceMean", ((2, 3, 4), _i64(-1)), {"keepdims": 0}, opset=18),
    "reduce_sum_all": Case("ReduceSum", ((2, 3, 4),), {"keepdims": 0}),
    "reduce_sum_input_axes": Case("ReduceSum", ((2, 3, 4), _i64(1))),
    "reduce_max": Case("ReduceMax", ((2, 3, 4),), {"axes": [0, 2]}, exact=True),
    "reduce_min": Case("ReduceMin", ((2, 3, 4),), {"axes": [1], "keepdims": 0}, exact=True),
    "reduce_l2": Case("ReduceL2", ((2, 3, 4),), {"axes": [-1]}),
    "reduce_l2_input_axes_opset18": Case("ReduceL2", ((2, 3, 4), _i64(1)), {"keepdims": 0}, opset=18),
    # ---- normalisation, softmax
    "layernorm_last_axis": Case("LayerNormalization", ((2, 5, 8), _w(8), _w(8)), opset=17),
    "layernorm_axis1_no_bias": Case("LayerNormalization", ((2, 5, 8), _w(5, 8)), {"axis": 1, "epsilon": 1e-3},
                                    opset=17),
    "layernorm_mean_invstd":
        Case("LayerNormalization", ((2, 5, 8), _w(8), _w(8)), opset=17, outputs=(F32, F32, F32)),
    "softmax_last": Case("Softmax", ((2, 3, 7),)),
    "softmax_axis1": Case("Softmax", ((2, 3, 7),), {"axis": 1}),
    "batchnorm":
        Case("BatchNormalization", (X4, _w(3), _w(3), _w(3), np.abs(_w(3)) + 0.5), {"epsilon": 1e-3}),
    # ---- elementwise
    "add_broadcast": Case("Add", ((2, 3, 4), (3, 1))),
    "sub": Case("Sub", ((2, 3, 4), _w(4))),
    "mul": Case("Mul", ((2, 3, 4), (2, 3, 4))),
    "div": Case("Div", ((2, 3, 4), (3, 4)), positive=True),
    "relu": Case("Relu", ((2, 3, 4),), exact=True),
    "clip_min_max": Case("Clip", ((2, 3, 4), _f32(-0.5).reshape(()), _f32(0.7).reshape(())), exact=True),
    "clip_max_only": Case("Clip", ((2, 3, 4), None, _f32(0.3).reshape(())), exact=True),
    "clip_none": Case("Clip", ((2, 3, 4),), exact=True),
    "sigmoid": Case("Sigmoid", ((2, 3, 4),)),
    "hardsigmoid": Case("HardSigmoid", ((2, 3, 4),), {"alpha": 0.3, "beta": 0.4}),
    "hardsigmoid_default": Case("HardSigmoid", ((4, 50),)),
    "hardswish": Case("HardSwish", ((4, 50),), opset=14),
    "leakyrelu": Case("LeakyRelu", ((2, 3, 4),), {"alpha": 0.1}),
    "prelu_channel": Case("PRelu", ((2, 3, 4, 4), _w(3, 1, 1))),
    "prelu_last_dim": Case("PRelu", ((2, 3, 5), _w(5))),
    "erf": Case("Erf", ((2, 3, 4),)),
    "gelu_none": Case("Gelu", ((2, 3, 4),), opset=20),
    "gelu_tanh": Case("Gelu", ((2, 3, 4),), {"approximate": "tanh"}, opset=20),
    "tanh": Case("Tanh", ((2, 3, 4),)),
    "sqrt": Case("Sqrt", ((2, 3, 4),), positive=True),
    "pow_scalar": Case("Pow", ((2, 3, 4), _f32(2.0).reshape(())), positive=True),
    "pow_tensor": Case("Pow", ((2, 3, 4), (3, 4)), positive=True),
    "exp": Case("Exp", ((2, 3, 4),)),
    "neg": Case("Neg", ((2, 3, 4),), exact=True),
    "identity": Case("Identity", ((2, 3, 4),), exact=True),
    "max": Case("Max", ((2, 3, 4), (3, 4), _w(4)), exact=True),
    "min": Case("Min", ((2, 3, 4), (2, 3, 4)), exact=True),
    "sum": Case("Sum", ((2, 3, 4), (3, 4), (4,))),
    # ---- shape / movement
    "concat": Case("Concat", ((2, 3, 4), (2, 5, 4)), {"axis": 1}, exact=True),
    "reshape_zero_minus1": Case("Reshape", ((2, 3, 4), _i64(0, -1)), exact=True),
    "reshape_allowzero": Case("Reshape", ((2, 3, 4), _i64(4, 3, 2)), {"allowzero": 1}, opset=14, exact=True),
    "flatten_axis2": Case("Flatten", ((2, 3, 4, 5),), {"axis": 2}, exact=True),
    "flatten_axis0": Case("Flatten", ((2, 3, 4),), {"axis": 0}, exact=True),
    "flatten_axis_negative": Case("Flatten", ((2, 3, 4, 5),), {"axis": -1}, exact=True),
    "transpose_perm": Case("Transpose", ((2, 3, 4, 5),), {"perm": [0, 2, 3, 1]}, exact=True),
    "transpose_default": Case("Transpose", ((2, 3, 4),), exact=True),
    "squeeze_input_axes": Case("Squeeze", ((2, 1, 4, 1), _i64(1, -1)), exact=True),
    "squeeze_attr_axes_opset11": Case("Squeeze", ((2, 1, 4, 1),), {"axes": [3]}, opset=11, exact=True),
    "squeeze_all": Case("Squeeze", ((2, 1, 4, 1),), exact=True),
    "unsqueeze_input_axes": Case("Unsqueeze", ((2, 4), _i64(0, -1)), exact=True),
    "unsqueeze_attr_axes_opset11": Case("Unsqueeze", ((2, 4),), {"axes": [1, 3]}, opset=11, exact=True),
    "slice_steps": Case("Slice", ((6, 8, 5), _i64(1, 0), _i64(5, 100), _i64(0, 1), _i64(2, 3)), exact=True),
    "slice_negative_step": Case("Slice", ((6, 8), _i64(-1), _i64(-100), _i64(1), _i64(-2)), exact=True),
    "slice_default_axes": Case("Slice", ((6, 8), _i64(1, -3), _i64(-1, 9223372036854775807)), exact=True),
    "split_sizes": Case("Split", ((2, 6, 3), _i64(2, 4)), {"axis": 1}, exact=True, outputs=(F32, F32)),
    "split_equal": Case("Split", ((2, 6, 3),), {"axis": 1}, exact=True, outputs=(F32, F32, F32)),
    "split_num_outputs_uneven": Case("Split", ((7, 3),), {"num_outputs": 3}, opset=18, exact=True,
                                     outputs=(F32, F32, F32)),
    "gather_axis1": Case("Gather", ((3, 5, 2), _i64(4, 0, -1, 2)), {"axis": 1}, exact=True),
    "gather_scalar": Case("Gather", ((3, 5), np.array(-2, dtype=np.int64)), exact=True),
    "gather_2d_indices": Case("Gather", ((6, 3), _i64(0, 5, 1, 1).reshape(2, 2)), exact=True),
    "shape": Case("Shape", ((2, 3, 4),), exact=True, outputs=(TP.INT64,)),
    "shape_start_end": Case("Shape", ((2, 3, 4, 5),), {"start": 1, "end": -1}, opset=15, exact=True,
                            outputs=(TP.INT64,)),
    "cast_double": Case("Cast", ((2, 3),), {"to": TP.DOUBLE}, exact=True, outputs=(TP.DOUBLE,)),
    "cast_half": Case("Cast", ((2, 3),), {"to": TP.FLOAT16}, exact=True, outputs=(TP.FLOAT16,)),
    "cast_int64": Case("Cast", ((2, 3),), {"to": TP.INT64}, exact=True, outputs=(TP.INT64,)),
    "expand": Case("Expand", ((3, 1), _i64(2, 1, 4)), exact=True),
    "expand_keep_larger": Case("Expand", ((2, 3), _i64(1, 1)), exact=True),
    "constant_of_shape": Case("ConstantOfShape", (_i64(2, 3),),
                              {"value": onnx.numpy_helper.from_array(_f32(1.5))}, exact=True),
    "constant_of_shape_int": Case("ConstantOfShape", (_i64(4),),
                                  {"value": onnx.numpy_helper.from_array(_i64(7))}, exact=True,
                                  outputs=(TP.INT64,)),
    "range_int": Case("Range", (np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)),
                      exact=True, outputs=(TP.INT64,)),
    "range_float_negative":
        Case("Range", (_f32(2.0).reshape(()), _f32(-1.0).reshape(()), _f32(-0.75).reshape(())), exact=True),
    "constant": Case("Constant", (), {"value": onnx.numpy_helper.from_array(_w(2, 3))}, exact=True),
    # ---- Resize (opset 13 inputs: X, roi, scales, sizes)
    "resize_nearest_asym_floor_x2": Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 2, 2)),
                                         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                          "nearest_mode": "floor"}, exact=True),
    "resize_nearest_halfpixel_default_x3": Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 3, 3)), exact=True),
    "resize_nearest_halfpixel_x1_5": Case("Resize", ((1, 2, 4, 6), None, _f32(1, 1, 1.5, 1.5)), exact=True),
    "resize_nearest_prefer_ceil_down": Case("Resize", ((1, 2, 8, 9), None, _f32(1, 1, 0.5, 0.75)),
                                            {"nearest_mode": "round_prefer_ceil"}, exact=True),
    "resize_nearest_ceil_sizes": Case("Resize", ((1, 2, 4, 5), None, None, _i64(1, 2, 7, 9)),
                                      {"nearest_mode": "ceil"}, exact=True),
    "resize_nearest_align_corners": Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 2, 2)),
                                         {"coordinate_transformation_mode": "align_corners"}, exact=True),
    "resize_nearest_asym_prefer_floor": Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 2, 2)),
                                             {"coordinate_transformation_mode": "asymmetric"}, exact=True),
    "resize_linear_halfpixel_x2": Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 2, 2)), {"mode": "linear"}),
    "resize_linear_align_corners_sizes":
        Case("Resize", ((1, 2, 4, 5), None, None, _i64(1, 2, 7, 9)),
             {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    "resize_linear_asymmetric_x1_5":
        Case("Resize", ((1, 2, 4, 6), None, _f32(1, 1, 1.5, 1.5)),
             {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}),
    "resize_linear_pytorch_half_pixel_down":
        Case("Resize", ((1, 2, 10, 9), None, _f32(1, 1, 0.6, 0.5)),
             {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    "resize_linear_half_pixel_symmetric":
        Case("Resize", ((1, 2, 4, 5), None, _f32(1, 1, 2.5, 1.5)),
             {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, opset=19),
    "resize_linear_3d": Case("Resize", ((2, 3, 5), None, _f32(1, 1, 2)), {"mode": "linear"}),
    # ---- QuantizeLinear / DequantizeLinear
    "quantize_uint8_zp":
        Case("QuantizeLinear", ((2, 4, 10), _f32(0.1).reshape(()), np.array(128, np.uint8)),
             exact=True, outputs=(TP.UINT8,), feed=_QX),
    "quantize_int8_ties":
        Case("QuantizeLinear", ((2, 4, 10), _f32(0.1).reshape(()), np.array(0, np.int8)),
             exact=True, outputs=(TP.INT8,), feed=_QX),
    "quantize_no_zp":
        Case("QuantizeLinear", ((2, 4, 10), _f32(0.05).reshape(())), exact=True, outputs=(TP.UINT8,),
             feed=_QX),
    "quantize_per_axis":
        Case("QuantizeLinear", ((2, 4, 10), _f32(0.1, 0.05, 0.2, 0.025), np.array([0, 3, -5, 1], np.int8)),
             exact=True, outputs=(TP.INT8,), feed=_QX),
    "quantize_int16_axis2":
        Case("QuantizeLinear", ((2, 3, 4), _f32(1e-4, 2e-4, 3e-4, 4e-4), np.array([0, 5, -7, 100], np.int16)),
             {"axis": 2}, opset=21, exact=True, outputs=(TP.INT16,)),
    "dequantize_int8":
        Case("DequantizeLinear", (_rng.integers(-128, 128, (2, 5)).astype(np.int8), _f32(0.02).reshape(()),
                                  np.array(3, np.int8)), exact=True),
    "dequantize_uint8_no_zp":
        Case("DequantizeLinear", (_rng.integers(0, 256, (2, 5)).astype(np.uint8), _f32(0.02).reshape(())),
             exact=True),
    "dequantize_weight_axis0":
        Case("DequantizeLinear", (_rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8),
                                  _f32(0.1, 0.01, 0.003)), {"axis": 0}, exact=True),
    "dequantize_int32_bias":
        Case("DequantizeLinear", (_i64(-2**31 + 1, -77777777, 5, 16777217).astype(np.int32),
                                  _f32(1e-4, 3e-4, 2e-3, 7e-6)), {"axis": 0}, exact=True),
    "dequantize_int4_per_axis":
        Case("DequantizeLinear", (_rng.integers(-8, 8, (4, 3)).astype(ml_dtypes.int4),
                                  _f32(0.5, 0.25, 0.125, 1.5)), {"axis": 0}, opset=21, exact=True),
}


def _model(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, spec in enumerate(case.inputs):
        if spec is None:
            names.append("")
        elif isinstance(spec, np.ndarray):
            names.append(f"c{i}")
            inits.append(onnx.numpy_helper.from_array(spec, f"c{i}"))
        else:
            names.append(f"x{i}")
            graph_inputs.append(helper.make_tensor_value_info(f"x{i}", F32, list(spec)))
            if case.feed is not None and not feeds:
                value = case.feed
            elif case.positive:
                value = rng.uniform(0.5, 2.5, spec).astype(np.float32)
            else:
                value = (rng.standard_normal(spec) * 2).astype(np.float32)
            feeds[f"x{i}"] = value
    outs = [f"y{i}" for i in range(len(case.outputs))]
    node = helper.make_node(case.op, names, outs, **case.attrs)
    graph = helper.make_graph([node], "case", graph_inputs,
                              [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, case.outputs)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 10 if case.opset >= 21 else 8
    return model, feeds


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    case = CASES[name]
    model, feeds = _model(case)
    node = gs.import_onnx(model).nodes[0]
    assert supported(node) is None, supported(node)
    want = _run_ort(model, feeds)
    block = block_from_model(model, list(feeds), [o.name for o in model.graph.output])
    got = block(*(torch.from_numpy(v) for v in feeds.values()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.detach().numpy()
        w = np.asarray(w)
        if w.dtype.name in ("int4", "uint4"):
            w = w.astype(np.int64)
        assert g.shape == w.shape, f"shape {g.shape} vs onnxruntime {w.shape}"
        if case.exact:
            np.testing.assert_array_equal(g.astype(np.float64), w.astype(np.float64))
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=case.atol)


def test_every_registered_op_has_a_case() -> None:
    assert set(OPS) <= {c.op for c in CASES.values()}, set(OPS) - {c.op for c in CASES.values()}


@pytest.mark.parametrize(("op", "inputs", "attrs", "words"), [
    ("Resize", ((1, 1, 4, 4), None, _f32(1, 1, 2, 2)), {"mode": "cubic"}, "mode='cubic'"),
    ("Resize", ((1, 1, 4, 4), None, _f32(1, 1, 2, 2)),
     {"coordinate_transformation_mode": "tf_crop_and_resize"}, "coordinate_transformation_mode"),
    ("Reshape", ((2, 3), (2,)), {}, "graph input"),
    ("Conv", ((1, 1, 4, 4), _w(1, 1, 3, 3)), {"auto_pad": "BOGUS"}, "auto_pad"),
    ("BatchNormalization", ((1, 3, 2, 2), _w(3), _w(3), _w(3), _w(3)), {"training_mode": 1}, "training_mode"),
    ("Cast", ((2,),), {"to": TP.STRING}, "Cast"),
    ("NonMaxSuppression", ((1, 4, 4),), {}, "no torch implementation"),
])
def test_supported_reports_reason(op: str, inputs: tuple, attrs: dict, words: str) -> None:
    names, vis, inits = [], [], []
    for i, spec in enumerate(inputs):
        if spec is None:
            names.append("")
        elif isinstance(spec, np.ndarray):
            names.append(f"c{i}")
            inits.append(onnx.numpy_helper.from_array(spec, f"c{i}"))
        else:
            names.append(f"x{i}")
            vis.append(helper.make_tensor_value_info(f"x{i}", F32, list(spec)))
    graph = helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], "g", vis,
                              [helper.make_tensor_value_info("y", F32, None)], initializer=inits)
    node = gs.import_onnx(helper.make_model(graph)).nodes[0]
    reason = supported(node)
    assert reason is not None and words in reason, reason
