"""What onnxruntime's CPU integer kernels compute, and 8-bit weights that no CPU's kernel can saturate.

**The kernels.** onnxruntime fuses ``DQ -> Conv/Gemm/MatMul -> [Q]`` into QLinearConv, QGemm,
QLinearMatMul or MatMulIntegerToFloat, which run MLAS's 8-bit GEMM on the stored codes: activations
``a`` as uint8 (int8 activations are shifted by +128 to uint8 and the shift is subtracted afterwards
through the weights' column sums) and weights ``q`` as int8, accumulated as ``sum_k a_k q_k`` plus
zero-point corrections. What the accumulation does depends on the CPU (:mod:`onnxq.core.cpu`):

* ``vnni`` (``vpdpbusd``, AMX ``tdpbusd``) and ``arm64`` (``sdot``/``udot``): int32, exact.
* ``avx2`` and ``avx512`` without VNNI: ``vpmaddubsw`` computes, for every even ``k``,
  ``sat16(a_k q_k + a_{k+1} q_{k+1})`` with ``sat16(v) = clip(v, -32768, 32767)``, and ``vpmaddwd``
  then adds those int16 values exactly into int32. A pair saturates when, e.g., ``a_k = a_{k+1} = 255``
  and ``q_k = q_{k+1} = 127``: ``64770 > 32767``.

Sources (onnxruntime ``core/mlas/lib``): ``platform.cpp`` picks the dispatch by CPUID (AVX-VNNI /
AVX512-VNNI / AMX before AVX512-Core before AVX2); ``x86_64/QgemmU8X8KernelAvx2.S`` and
``QgemmU8X8KernelAvx512Core.S`` multiply with ``vpmaddubsw`` + ``vpmaddwd`` on packed quads of K, their
VNNI variants with ``vpdpbusds``; ``x86_64/ConvSymKernelAvx2.S`` (QLinearConv's symmetric path) pairs the
same way; ``intrinsics/avx2/qdwconv_avx2.cpp`` widens to int16 products summed in int32; the ARM64
kernels accumulate with ``sdot``/``udot`` or ``smull``/``sadalp`` into int32. The graph transformer
``qdq_s8_to_u8.cc`` (x86) rewrites int8 activation Q/DQ pairs to uint8 with a +128 shift, so int8
activations reach the same u8s8 kernels.

``k`` runs along the reduction axis in MLAS's packed order, confirmed by probing the kernels one pair at
a time on an AVX2 CPU (``tests/targets/kernel_cases.py``, run under ``qemu -cpu Haswell``):

* Conv (QLinearConv, any group, kernel and stride): per group, ``K = (kh, kw, c)`` with the group's input
  channels innermost (NHWC im2col), i.e. the weight ``W[m, c, kh, kw]`` read as ``W.transpose(0, 2, 3, 1)``.
  The depthwise kernel (``group == C_in == C_out``) multiplies in int32 and never saturates; a depthwise
  conv with a channel multiplier (``C_out > group == C_in``) runs the GEMM with ``K = (kh, kw)``.
* Gemm (QGemm): ``K`` is the reduction axis of ``B`` (axis 1 with ``transB = 1``, axis 0 otherwise).
* MatMul (QLinearMatMul, MatMulIntegerToFloat): ``K`` is the weight's axis -2.

An odd ``K`` pairs its last element with a zero.

**Saturation-free weights.** Activation codes can be anything in [0, 255] at run time, so a pair of
stored codes of one output channel can saturate iff both have one sign and ``|q_k| + |q_{k+1}| > 128``
(``255 * 128 = 32640 <= 32767``; ``255 * 129 > 32767``; pairs of opposite sign stay within
``255 * 127``): :data:`PAIR_LIMIT`. Codes that keep every pair within it are exact on every CPU, so
onnxruntime at ORT_ENABLE_ALL computes what the QDQ graph says. How onnxq rounds under that limit
(per channel scale and per pair, not a blanket 7-bit grid) is :mod:`onnxq.targets.weight_codes`;
:func:`repair_pairs` fixes codes chosen elsewhere (learned by reconstruction).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.cpu import cpu_family
from onnxq.core.gemm_layout import Layout, gemm_layout

#: Largest |q_k| + |q_{k+1}| of one sign that no activation code in [0, 255] can saturate.
PAIR_LIMIT = 128
_INT16 = (-32768, 32767)

_EXACT = frozenset({"vnni", "arm64", "int32"})


def saturates(kernels: str) -> bool:
    """Whether 8-bit weights must be fitted for ``Config.kernels`` (:data:`onnxq.config.choices.KERNELS`):
    "portable" (every CPU) and the saturating families yes; "auto" when this machine's family saturates."""
    family = cpu_family() if kernels == "auto" else kernels
    return family not in _EXACT


def layout_of(op: str, attrs: dict, weight_shape: tuple[int, ...], input_channels: int | None) -> Layout | None:
    """The GEMM layout of a weight whose op runs a saturating kernel, or None (the depthwise kernel,
    ConvTranspose, MatMul with a batched weight)."""
    shape = tuple(int(d) for d in weight_shape)
    group = int(attrs.get("group", 1))
    if op == "Conv" and group > 1 and len(shape) >= 3 and shape[1] == 1 and shape[0] == group \
            and input_channels in (None, group):
        return None  # depthwise, multiplier 1: MLAS's int32 depthwise kernel
    return gemm_layout(op, attrs, shape)


def pair_violations(codes: np.ndarray) -> np.ndarray:
    """``(M, ceil(K / 2))`` mask of the pairs (k, k+1) of one sign whose magnitudes pass ``PAIR_LIMIT``."""
    q = _padded(np.asarray(codes, dtype=np.int64))
    a, b = q[:, 0::2], q[:, 1::2]
    return (np.sign(a) * np.sign(b) > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT)


def repair_pairs(codes: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """``codes`` (M, K) with every violating pair trimmed to ``PAIR_LIMIT`` at the least squared error to the
    real codes ``ideal``. In a pair over the limit by ``e = |q_k| + |q_{k+1}| - 128`` the magnitudes drop by
    ``t_k + t_{k+1} = e`` (``t >= 0``, never past zero) minimising ``(r_k - t_k)^2 + (r_{k+1} - t_{k+1})^2``
    with ``r = |q| - |c|`` each code's rounding residual: ``t_k = clip(round((r_k + e - r_{k+1}) / 2), 0, e)``.
    Returns int64 codes."""
    k = codes.shape[1]
    q, c = _padded(np.asarray(codes, dtype=np.int64)), _padded(np.asarray(ideal, dtype=np.float64))
    a, b = q[:, 0::2], q[:, 1::2]
    bad = (np.sign(a) * np.sign(b) > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT)
    if not bad.any():
        return np.asarray(codes, dtype=np.int64).copy()
    excess = np.abs(a) + np.abs(b) - PAIR_LIMIT
    r_a = np.abs(a) - np.abs(c[:, 0::2])
    r_b = np.abs(b) - np.abs(c[:, 1::2])
    t_a = np.clip(np.rint((r_a + excess - r_b) / 2), np.maximum(0, excess - np.abs(b)),
                  np.minimum(excess, np.abs(a))).astype(np.int64)
    t_b = excess - t_a
    sign = np.sign(a)
    q[:, 0::2] = np.where(bad, a - sign * t_a, a)
    q[:, 1::2] = np.where(bad, b - sign * t_b, b)
    return q[:, :k]


def repair_weight(codes: np.ndarray, ideal: np.ndarray, layout: Layout) -> np.ndarray:
    """:func:`repair_pairs` on a weight tensor (codes and real codes in the weight's shape, read in
    ``layout``); the codes themselves when no pair is over the limit."""
    mat = layout.to_matrix(np.asarray(codes, dtype=np.int64))
    if not pair_violations(mat).any():
        return codes
    fixed = repair_pairs(mat, layout.to_matrix(np.asarray(ideal, dtype=np.float64)))
    return layout.from_matrix(fixed).astype(np.asarray(codes).dtype)


def emulate_accumulation(a: np.ndarray, q: np.ndarray, family: str) -> np.ndarray:
    """``sum_k a[n, k] q[m, k]`` as the kernels of ``family`` accumulate it: ``a`` uint8 codes (N, K),
    ``q`` int8 codes (M, K) in the kernel's K order; returns int64 (N, M)."""
    a64, q64 = np.asarray(a, dtype=np.int64), np.asarray(q, dtype=np.int64)
    if family in _EXACT:
        return a64 @ q64.T
    a2, q2 = _padded(a64), _padded(q64)
    pairs = a2[:, None, 0::2] * q2[None, :, 0::2] + a2[:, None, 1::2] * q2[None, :, 1::2]
    return np.clip(pairs, *_INT16).sum(axis=-1)


def _padded(x: np.ndarray) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, x.shape[1] % 2))) if x.shape[1] % 2 else x


def node_layout(node: gs.Node, weight_shape: tuple[int, ...]) -> Layout | None:
    """The GEMM layout of ``node``'s weight (its input channels from the data input's shape when known)."""
    shape = node.inputs[0].shape if node.inputs and node.inputs[0].shape else None
    channels = shape[1] if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None
    return layout_of(node.op, node.attrs, weight_shape, channels)


def constrained_layout(node: gs.Node, weight_shape: tuple[int, ...], bits: int, kernels: str,
                       input_quantized: bool) -> Layout | None:
    """The layout of ``node``'s weight when its codes must be fitted: 8-bit codes of an op onnxruntime runs
    as an integer GEMM (its input is quantized) under ``kernels`` that saturate; else None."""
    if bits != 8 or not input_quantized or not saturates(kernels):
        return None
    return node_layout(node, weight_shape)
