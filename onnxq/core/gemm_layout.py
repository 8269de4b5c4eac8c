"""A weight read as the matrix of the integer GEMM that runs it: one row per output channel, one
column per reduction index ``k`` in the order the GEMM walks them.

* Conv ``W[m, c, kh, kw]`` (per group): ``K = (kh, kw, c)``, the group's input channels innermost: the
  order of an NHWC im2col, which is how onnxruntime's QLinearConv packs its reduction
  (:mod:`onnxq.targets.ort_kernels`) and how :mod:`onnxq.data.moments` lays out a conv's input patches.
  Row ``m`` belongs to group ``m // (M / group)`` and reads input channels ``g * C_g .. (g + 1) * C_g - 1``.
* Gemm ``B``: ``K`` is its reduction axis (axis 1 with ``transB = 1``, else axis 0).
* MatMul ``W[K, N]``: ``K`` is axis 0, one row per column ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How a weight tensor of ``shape`` reads as a matrix ``(output channel, K)``."""

    op: str
    shape: tuple[int, ...]
    group: int = 1
    trans_b: bool = False

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """``(M, K)``: one row per output channel, K in the GEMM's order (within each group)."""
        if self.op == "Conv":
            return np.ascontiguousarray(w.transpose(0, *range(2, w.ndim), 1).reshape(w.shape[0], -1))
        if self.op == "Gemm":
            return np.ascontiguousarray(w if self.trans_b else w.T)
        return np.ascontiguousarray(w.T)  # MatMul [K, N]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_matrix`."""
        if self.op == "Conv":
            spatial = self.shape[2:]
            return np.ascontiguousarray(m.reshape(self.shape[0], *spatial, self.shape[1])
                                        .transpose(0, len(spatial) + 1, *range(1, len(spatial) + 1)))
        if self.op == "Gemm":
            return np.ascontiguousarray(m if self.trans_b else m.T)
        return np.ascontiguousarray(m.T)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(M, K)`` of :meth:`to_matrix`."""
        if self.op == "Conv":
            return self.shape[0], int(np.prod(self.shape[1:]))
        if self.op == "Gemm" and self.trans_b:
            return self.shape[0], self.shape[1]
        return self.shape[1], self.shape[0]

    def group_of_rows(self) -> np.ndarray:
        """``(M,)``: the group each row belongs to (all 0 but for grouped convs)."""
        rows = self.matrix_shape[0]
        return np.arange(rows) // max(1, rows // self.group)


def gemm_layout(op: str, attrs: dict, weight_shape: tuple[int, ...]) -> Layout | None:
    """The layout of a Conv / Gemm / MatMul weight, or None for shapes no GEMM runs this way (a batched
    MatMul weight, a 1-D weight)."""
    shape = tuple(int(d) for d in weight_shape)
    if op == "Conv" and len(shape) >= 3:
        return Layout("Conv", shape, int(attrs.get("group", 1)))
    if op == "Gemm" and len(shape) == 2:
        return Layout("Gemm", shape, trans_b=bool(int(attrs.get("transB", 0))))
    if op == "MatMul" and len(shape) == 2:
        return Layout("MatMul", shape)
    return None
