"""The second moment ``E[x x^T]`` of a weighted op's input, in the GEMM layout of its weight.

A Conv, Gemm or MatMul computes ``y_m = sum_k W[m, k] x_k`` over the reduction index ``k`` of
:class:`~onnxq.core.gemm_layout.Layout`; ``x`` is a row of the op's input matrix: for a Conv, one
receptive field (an im2col patch, ``(kh, kw, c)`` with the group's channels innermost, zero padding
included), for Gemm a row of ``A``, for MatMul the last axis. A weight error ``dW`` then costs
``E[(dW x)^2] = dW H dW^T`` with ``H = E[x x^T]`` (per group for grouped convs), the matrix GPTQ
rounds against (:mod:`onnxq.core.gptq`).

The mean streams over the calibration batches. A batch contributes at most :data:`ROWS_PER_BATCH`
rows, fewer when a row is wide (:data:`ELEMENTS`; patch positions taken at an even stride over samples
and positions, so the estimate costs the same on a 112x112 map as on a 7x7 one), and ``H`` is kept only
up to :data:`MAX_K` columns per group (a larger layer gets None: its rounding falls back to no error
feedback).
"""

from __future__ import annotations

import math

import numpy as np

from onnxq.core.gemm_layout import Layout

#: Rows (patches, tokens) one batch adds to the estimate at most.
ROWS_PER_BATCH = 4096
#: The largest reduction (per group) whose ``K x K`` matrix is kept (4608 = 3x3 over 512 channels: 170 MB).
MAX_K = 4608
#: Values (rows x row width) one batch gathers at most: wide rows (a depthwise conv over 1152 channels
#: reads 10,368 values a position) get fewer rows.
ELEMENTS = 1 << 21


class InputMoments:
    """Streaming ``E[x x^T]`` of one op's input, ``(group, K_g, K_g)``."""

    def __init__(self, op: str, attrs: dict, layout: Layout) -> None:
        self.op, self.attrs, self.layout = op, attrs, layout
        self.groups = layout.group if op == "Conv" else 1
        self.k = layout.matrix_shape[1]
        self.total: np.ndarray | None = None
        self.count = 0

    @property
    def nbytes(self) -> int:
        """The memory ``H`` takes (float64, one ``K_g x K_g`` matrix per group)."""
        return 8 * self.groups * self.k * self.k

    @property
    def kept(self) -> bool:
        """Whether ``H`` fits :data:`MAX_K`."""
        return self.k <= MAX_K

    def update(self, value: np.ndarray) -> None:
        """Add one batch of the op's input."""
        if not self.kept:
            return
        rows = self._rows(np.asarray(value))  # (groups, R, K_g) float32
        if rows is None:
            return
        if rows.shape[0] == 1:
            gram = (rows[0].T @ rows[0])[None]  # one BLAS product
        else:  # many small groups (a depthwise conv: one 9x9 matrix per channel)
            gram = np.einsum("grk,grl->gkl", rows, rows)
        gram = gram.astype(np.float64)  # a batch's sum in float32, the running sum in float64
        self.total = gram if self.total is None else self.total + gram
        self.count += rows.shape[1]

    def hessian(self) -> np.ndarray | None:
        """``(group, K_g, K_g)`` float64, or None (nothing seen, or too large)."""
        if self.total is None or self.count == 0:
            return None
        return self.total / self.count

    # ----------------------------------------------------------------- rows of x
    def _rows(self, x: np.ndarray) -> np.ndarray | None:
        if self.op == "Conv":
            return self._patches(x)
        if self.op == "Gemm":
            a = x.T if int(self.attrs.get("transA", 0)) else x
            flat = a.reshape(-1, a.shape[-1])
        else:
            flat = x.reshape(-1, x.shape[-1])
        if flat.shape[1] != self.k:
            return None
        return _every(flat, self._most(self.k)).astype(np.float32)[None]

    def _most(self, width: int) -> int:
        """Rows per batch: :data:`ROWS_PER_BATCH`, fewer for wide rows (at most :data:`ELEMENTS` values)."""
        return max(1, min(ROWS_PER_BATCH, ELEMENTS // max(1, width)))

    def _patches(self, x: np.ndarray) -> np.ndarray | None:
        """Receptive fields of evenly spaced output positions, gathered from the unpadded input (taps in
        the padding read 0): ``(group, R, (kh, kw, c_g))``."""
        kernel = tuple(self.layout.shape[2:])
        squeeze = x.ndim == 3 and len(kernel) == 1
        if squeeze:  # 1-D conv as a 2-D one of height 1
            x, kernel = x[:, :, None, :], (1, *kernel)
        if x.ndim != 4 or len(kernel) != 2 or x.shape[1] != self.layout.shape[1] * self.groups:
            return None
        n, c, h, w = x.shape
        strides, dilations, pads = _geometry(self.attrs, (h, w), kernel, squeeze)
        reach = [d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True)]
        oh = (h + pads[0] + pads[2] - reach[0]) // strides[0] + 1
        ow = (w + pads[1] + pads[3] - reach[1]) // strides[1] + 1
        if oh <= 0 or ow <= 0:
            return None
        picks = _every(np.arange(n * oh * ow), self._most(c * kernel[0] * kernel[1]))
        b, i, j = np.unravel_index(picks, (n, oh, ow))
        ys = i[:, None] * strides[0] - pads[0] + np.arange(kernel[0])[None, :] * dilations[0]  # (R, kh)
        xs = j[:, None] * strides[1] - pads[1] + np.arange(kernel[1])[None, :] * dilations[1]  # (R, kw)
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (R, kh, kw)
        patches = x[b[:, None, None], :, np.clip(ys, 0, h - 1)[:, :, None], np.clip(xs, 0, w - 1)[:, None, :]]
        patches = np.where(inside[..., None], patches, 0).astype(np.float32)  # (R, kh, kw, C)
        per_group = self.layout.shape[1]
        rows = patches.reshape(len(picks), *kernel, self.groups, per_group).transpose(3, 0, 1, 2, 4)
        return rows.reshape(self.groups, len(picks), -1)


def _every(rows: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` rows, taken at an even stride."""
    return rows if len(rows) <= most else rows[:: math.ceil(len(rows) / most)]


def _geometry(attrs: dict, size: tuple[int, ...], kernel: tuple[int, ...], squeeze: bool
              ) -> tuple[list[int], list[int], list[int]]:
    """Strides, dilations and pads (top, left, bottom, right) of a 2-D conv (``auto_pad`` resolved)."""
    def pair(name: str, default: int) -> list[int]:
        values = [int(v) for v in attrs.get(name, [default] * (1 if squeeze else 2))]
        return [default, *values] if squeeze else values

    strides, dilations = pair("strides", 1), pair("dilations", 1)
    raw = [int(v) for v in attrs.get("pads", [0] * (2 if squeeze else 4))]
    pads = [0, raw[0], 0, raw[1]] if squeeze else raw
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            reach = dilations[axis] * (kernel[axis] - 1) + 1
            total = max((math.ceil(size[axis] / strides[axis]) - 1) * strides[axis] + reach - size[axis], 0)
            small = total // 2
            begin = small if auto == "SAME_UPPER" else total - small
            pads[axis], pads[axis + 2] = begin, total - begin
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    return strides, dilations, pads
