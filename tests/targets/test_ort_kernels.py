"""onnxruntime's CPU integer kernels: the numpy model of their accumulation against onnxruntime itself
(on this CPU and, through qemu, on an AVX2 CPU without VNNI), the pair limit, and quantized models that
are kernel-exact on every CPU."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq.core.cpu import cpu_family
from onnxq.core.gemm_layout import gemm_layout
from onnxq.targets.ort_kernels import (
    PAIR_LIMIT,
    emulate_accumulation,
    layout_of,
    pair_violations,
    repair_pairs,
    saturates,
)
from tests.helpers import make_model
from tests.targets.kernel_cases import CASES, run_case

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (apt install qemu-user) emulates an AVX2 CPU "
                                                     "without VNNI")


def _under_haswell(*args: str, timeout: int = 600) -> dict:
    """Run ``python -m tests.targets.kernel_cases ARGS`` on an emulated Haswell (AVX2, no VNNI) CPU."""
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-m", "tests.targets.kernel_cases", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------- the pair limit
def test_pair_limit_is_the_largest_that_no_activation_saturates() -> None:
    q1, q2 = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    a = np.arange(256)
    # the extremes of a1 q1 + a2 q2 over activations in [0, 255]: each product at 0 or at 255
    low = 255 * (np.minimum(q1, 0) + np.minimum(q2, 0))
    high = 255 * (np.maximum(q1, 0) + np.maximum(q2, 0))
    fits = (low >= -32768) & (high <= 32767)
    same_sign = np.sign(q1) * np.sign(q2) > 0
    within = ~same_sign | (np.abs(q1) + np.abs(q2) <= PAIR_LIMIT)
    assert np.array_equal(fits, within)
    assert a.max() * (PAIR_LIMIT + 1) > 32767  # one step past the limit saturates


def test_pair_violations_pair_along_k_and_pad_odd_k() -> None:
    codes = np.array([[100, 29, -100, -29, 100, -100, 127],
                      [64, 64, 65, 64, 0, 127, 127]])
    assert pair_violations(codes).tolist() == [[True, True, False, False], [False, True, False, False]]


def test_repair_pairs_is_the_least_squared_error_trim() -> None:
    rng = np.random.default_rng(0)
    ideal = rng.uniform(-127.4, 127.4, size=(200, 6))
    ideal[:, :2] = np.abs(ideal[:, :2])  # one sign: many pairs over the limit
    codes = np.clip(np.rint(ideal), -127, 127).astype(np.int64)
    fixed = repair_pairs(codes, ideal)
    assert not pair_violations(fixed).any()
    assert np.all(np.sign(fixed) * np.sign(codes) >= 0)  # never past zero
    for row in np.flatnonzero(pair_violations(codes)[:, 0]):
        a, b = codes[row, 0], codes[row, 1]
        best = min(((x, y) for x in range(a + 1) for y in range(b + 1) if x + y <= PAIR_LIMIT),
                   key=lambda p: (p[0] - ideal[row, 0]) ** 2 + (p[1] - ideal[row, 1]) ** 2)
        err = (fixed[row, 0] - ideal[row, 0]) ** 2 + (fixed[row, 1] - ideal[row, 1]) ** 2
        assert err <= (best[0] - ideal[row, 0]) ** 2 + (best[1] - ideal[row, 1]) ** 2 + 1e-9
    untouched = ~pair_violations(codes)[:, 0]
    assert np.array_equal(fixed[untouched, :2], codes[untouched, :2])


def test_emulation_saturates_pairs_exactly_as_int16() -> None:
    a = np.array([[255, 255, 255, 0]])
    q = np.array([[127, 127, 127, 127], [100, 28, -127, -127]])
    assert emulate_accumulation(a, q, "avx2").tolist() == [[32767 + 255 * 127, 255 * 128 - 255 * 127]]
    assert emulate_accumulation(a, q, "vnni").tolist() == [[255 * 127 * 3, 255 * 128 - 255 * 127]]


def test_families_that_saturate() -> None:
    assert saturates("portable") and saturates("avx2") and saturates("avx512")
    assert not saturates("vnni") and not saturates("arm64") and not saturates("int32")
    assert saturates("auto") == (cpu_family() not in ("vnni", "arm64"))


def test_depthwise_convs_run_the_exact_kernel_and_others_a_gemm() -> None:
    assert layout_of("Conv", {"group": 8}, (8, 1, 3, 3), 8) is None
    assert layout_of("Conv", {"group": 4}, (8, 1, 3, 3), 4) is not None  # channel multiplier 2: a GEMM
    assert layout_of("Conv", {}, (8, 4, 3, 3), 4) == gemm_layout("Conv", {}, (8, 4, 3, 3))


# ----------------------------------------------------------------------------- against onnxruntime
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_emulation_is_what_onnxruntime_computes_on_this_cpu(case) -> None:
    gaps = run_case(case, cpu_family())
    assert gaps["all_vs_family"] <= 1, gaps  # the fused kernels: this CPU's accumulation
    assert gaps["disable_vs_int32"] <= 1, gaps  # the QDQ graph: exact arithmetic


@needs_qemu
def test_emulation_is_what_onnxruntime_computes_on_avx2_without_vnni() -> None:
    results = _under_haswell("avx2")
    for name, gaps in results.items():
        assert gaps["all_vs_family"] <= 1, (name, gaps)
        assert gaps["disable_vs_int32"] <= 1, (name, gaps)
    saturating = [name for name, gaps in results.items() if gaps["all_vs_int32"] > 1]
    assert set(saturating) == {c.name for c in CASES} - {"conv_depthwise"}  # the cases do saturate there


# ----------------------------------------------------------------------------- quantized models
def _saturating_model():
    """Relu -> Conv 3x3 -> Relu -> Conv 1x1, channels with many large weights of one sign: nearest 8-bit
    codes break the pair limit, and the Relu outputs quantize to codes up to 255. (The last Conv's output
    is not quantized, so only the first Conv runs as QLinearConv.)"""
    rng = np.random.default_rng(3)
    w = rng.uniform(0.6, 1.0, size=(8, 8, 3, 3)) * np.where(rng.random((8, 8, 3, 3)) < 0.85, 1.0, -1.0)
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8,6,6] x) => (float[N,4,6,6] y) <float[8,8,3,3] w, float[8] b, float[4,8,1,1] w2> {
            r = Relu (x)
            c = Conv <pads=[1,1,1,1]> (r, w, b)
            h = Relu (c)
            y = Conv (h, w2)
        }""", w=w.astype(np.float32), b=np.zeros(8, np.float32))
    calib = [{"x": np.abs(rng.normal(size=(4, 8, 6, 6))).astype(np.float32) * 2} for _ in range(4)]
    return model, calib


def _violations(model) -> int:
    import onnx.numpy_helper as nh

    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None \
                and inits[node.input[0]].dtype == np.int8 and inits[node.input[0]].ndim == 4:
            q = inits[node.input[0]]
            total += int(pair_violations(gemm_layout("Conv", {}, q.shape).to_matrix(q.astype(np.int64))).sum())
    return total


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_portable_weights_keep_every_pair_within_the_limit(method) -> None:
    model, calib = _saturating_model()
    rounding = onnxq.GPTQ() if method == "gptq" else onnxq.RoundToNearest()
    free = onnxq.quantize(model, calib, onnxq.Config(kernels="int32", rounding=rounding), validation=calib[:1])
    fitted = onnxq.quantize(model, calib, onnxq.Config(rounding=rounding), validation=calib[:1])
    assert _violations(free.model) > 0  # the test model does provoke the limit
    assert _violations(fitted.model) == 0
    stats = fitted.report["weight_rounding"]
    assert stats["kernels"] == "portable" and stats["layers_fitted_to_kernels"] == 2
    assert stats["pairs_over_limit_nearest"] == _violations(free.model) or method == "gptq"
    assert stats["weight_error_vs_nearest"] >= 1.0


@needs_qemu
def test_portable_output_is_kernel_exact_on_avx2_and_int32_output_is_not(tmp_path) -> None:
    model, calib = _saturating_model()
    paths = []
    for kernels in ("int32", "portable"):
        result = onnxq.quantize(model, calib, onnxq.Config(kernels=kernels), validation=calib[:1])
        paths.append(str(tmp_path / f"{kernels}.onnx"))
        result.save(paths[-1])
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.concatenate([c["x"] for c in calib]))
    gaps = _under_haswell("levels", str(feeds), *paths)
    assert gaps[paths[0]] > 1.0  # int32 codes saturate there: ALL differs from the QDQ graph
    assert gaps[paths[1]] < 1e-3  # portable codes: ALL computes what the QDQ graph says


def test_every_pair_combination_of_a_small_conv_is_covered_by_the_layout() -> None:
    layout = gemm_layout("Conv", {}, (1, 3, 2, 2))
    w = np.arange(12).reshape(1, 3, 2, 2)
    m = layout.to_matrix(w)
    # K = (kh, kw, c): channels innermost
    expect = [w[0, c, i, j] for i, j, c in itertools.product(range(2), range(2), range(3))]
    assert m[0].tolist() == expect
    assert np.array_equal(layout.from_matrix(m), w)
