"""Ternary weights in the ONNX graph: the operator's codes and scale, the container, onnxruntime support.

A 2-bit weight spec is ternary (grid [-1, 1], :data:`onnxq.core.spec.TERNARY_WEIGHT`). Its codes and
scale come from one operator of :mod:`onnxq.ternary.operators` per output channel (per tensor with
``per_channel=False``):

    codes, s = operator(W)          W_hat = DequantizeLinear(codes, s) = codes * s

For twn and mquant-b the codes are *not* ``round(W / s)`` (their threshold is not s/2), so the
operator's codes are exported as they are, never re-quantized from the float weight.

Containers (``QuantConfig.ternary_storage``; ``QuantSpec.storage_bits``):

    int2   opset 25, 2 bits a weight (1/16 of FP32)
    int4   opset 21, 4 bits a weight (1/8)
    int8   opset 13, 8 bits a weight (1/4); every int8 runtime runs it

"auto" takes the target's narrowest container (``2``/``4``/``8`` in ``Target.weight_bits``).
onnxruntime 1.31 (measured, see :func:`int2_support`): DequantizeLinear of an int2 constant is
implemented, but at ORT_ENABLE_EXTENDED/ALL the QDQ fusion turns ``DQ(x) -> Conv/MatMul <- DQ(int2 W)
-> Q`` into QLinearConv / QLinearMatMul with an int2 weight, which those kernels reject, so the
session cannot be built (Gemm and weight-only DQ are fine). While that holds
(:func:`int2_needs_cast`), the written model reads each int2 constant through a Cast to int8
(:mod:`onnxq.core.weight_cast`): the file keeps 2 bits a weight and onnxruntime folds the Cast at load and
runs its int8 kernels.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from onnxq.core.spec import Granularity, QParams, QuantSpec, pow2_round, quantize
from onnxq.errors import UserError
from onnxq.ternary.operators import ternarize

log = logging.getLogger(__name__)

#: Container name -> stored bits.
STORAGE_BITS = {"int2": 2, "int4": 4, "int8": 8}


def ternary_weight(values: np.ndarray, spec: QuantSpec, method: str) -> tuple[QParams, np.ndarray]:
    """The operator's QParams (zero-point 0) and int64 codes in {-1, 0, 1} for a 2-bit ``spec``.

    Per channel along ``spec.axis`` for CHANNEL specs, per tensor otherwise. With power-of-two
    specs the operator's scale is rounded to the nearest power of two (in log2) and its codes kept.
    """
    if not spec.ternary:
        raise ValueError(f"ternary_weight needs a ternary spec, got {spec.describe()}")
    axis = spec.axis if spec.granularity is Granularity.CHANNEL else None
    result = ternarize(np.asarray(values, dtype=np.float32), method, axis=axis)
    scale = pow2_round(result.scale, "round") if spec.pow2 else result.scale
    qp = QParams(np.asarray(scale, dtype=np.float32), np.zeros(np.shape(scale), dtype=np.int64), spec)
    return qp, result.codes.astype(np.int64)


def weight_codes(values: np.ndarray, spec: QuantSpec, method: str, weight_method: str = "minmax",
                 qparams: QParams | None = None) -> tuple[QParams, np.ndarray]:
    """QParams and int64 codes of a weight: the ternary operator for ternary specs, else
    ``round(W / s)`` with ``qparams`` (or :func:`onnxq.core.observers.weight_qparams`)."""
    if spec.ternary:
        qp, codes = ternary_weight(values, spec, method)
        return (qparams or qp), codes
    if qparams is None:
        from onnxq.core.observers import weight_qparams

        qparams = weight_qparams(np.asarray(values, dtype=np.float32), spec, weight_method)
    return qparams, quantize(np.asarray(values, dtype=np.float32), qparams)


# ----- containers ----------------------------------------------------------------------------------


def allowed_storages(weight_bits: tuple[int, ...]) -> list[str]:
    """Containers a target with these weight bit widths accepts, narrowest first."""
    return [name for name, bits in sorted(STORAGE_BITS.items(), key=lambda kv: kv[1]) if bits in weight_bits]


def resolve_storage(target_name: str, weight_bits: tuple[int, ...], storage: str) -> str:
    """The concrete container for ternary weights under a target (see the module docstring).

    Raises:
        UserError: the target has no container for it, or not the one named.
    """
    allowed = allowed_storages(weight_bits)
    if not allowed:
        raise UserError(f"target {target_name} has no integer weight container for ternary weights")
    if storage == "auto":
        storage = allowed[0]
    elif storage not in allowed:
        raise UserError(f"target {target_name} does not allow ternary storage {storage}: use "
                        f"{' or '.join(allowed)} (or auto)")
    if storage == "int2" and int2_needs_cast():
        _say_int2_cast()
    return storage


@functools.lru_cache(maxsize=None)
def _say_int2_cast() -> None:
    """Log the Cast once per process (the storage is resolved once per layer)."""
    log.info("int2 weights (ternary or 4-level) are read through a Cast to int8: %s", int2_support()[1])


def int2_needs_cast() -> bool:
    """True when this onnxruntime cannot fuse int2 weights, so int2 constants get a Cast to int8."""
    return not int2_support()[0]


@functools.lru_cache(maxsize=None)
def int2_support() -> tuple[bool, str]:
    """(True, "") when onnxruntime CPU builds and runs QDQ Conv and MatMul with int2 weights at
    ORT_ENABLE_ALL, else (False, the reason). Probed once per process on two tiny models."""
    import onnx
    import onnxruntime as ort

    try:
        import ml_dtypes
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - both ship with onnx >= 1.17
        return False, f"int2 support unavailable ({exc})"
    if not hasattr(TensorProto, "INT2"):
        return False, f"onnx {onnx.__version__} has no INT2 type"
    for op, shape, w_shape, axis in (("Conv", [1, 2, 4, 4], [2, 2, 1, 1], 0), ("MatMul", [1, 2], [2, 2], 1)):
        inits = [numpy_helper.from_array(np.array([[1, -1], [0, 1]], dtype=ml_dtypes.int2).reshape(w_shape), "w"),
                 numpy_helper.from_array(np.full(2, 0.5, np.float32), "s"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=axis),
                 helper.make_node(op, ["xd", "wd"], ["y0"]),
                 helper.make_node("QuantizeLinear", ["y0", "xs", "xz"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "xs", "xz"], ["y"])]
        graph = helper.make_graph(nodes, "int2_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": np.ones(shape, np.float32)})
        except Exception as exc:  # the finding, not a crash
            first = " ".join(str(exc).split())
            detail = first[first.find("Type Error"):][:120] if "Type Error" in first else first[:120]
            return False, (f"onnxruntime {ort.__version__} cannot run {op} with int2 weights at ORT_ENABLE_ALL "
                           f"(its QDQ fusion builds a kernel without int2 support: {detail})")
    return True, ""
