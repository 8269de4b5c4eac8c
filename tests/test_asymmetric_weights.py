"""Asymmetric per-channel weights (QuantConfig.weight_symmetric=False): grid, export, targets, methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.core.weight_cast import cast_source, folded_casts
from onnxq.errors import UserError
from onnxq.targets.ort_kernels import saturates
from onnxq.targets.profiles import resolve_config
from onnxq.targets.rules import check_target
from tests.helpers import run_ort

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 8]} for i in range(0, 48, 8)]


def _weights(m: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """weight name -> (codes, scale, zero-point) of every non-bias constant DQ."""
    casts = folded_casts(m.graph)  # int4 weights are read through a Cast to int8 ...
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q_name, zp_name = n.input[0], n.input[2] if len(n.input) > 2 else ""
        sub = producer.get(q_name)
        if sub is not None and sub.op_type == "Sub":  # ... and with zero-points as q - z (WidenInt4Pass)
            q_name, zp_name = sub.input[0], producer[sub.input[1]].input[0]
        codes = inits.get(cast_source(casts, q_name))
        if codes is not None and codes.dtype != np.int32:
            zp = inits[cast_source(casts, zp_name)] if zp_name else np.zeros(1, np.int8)
            out[q_name] = (codes.astype(np.int64), inits[n.input[1]], zp.astype(np.int64))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_asymmetric_grid_uses_both_ends_and_validates(calib, bits):
    # nearest rounding on exact kernels: the min/max grid itself (the pair limit moves some channels'
    # ranges, tests/targets/test_weight_codes.py)
    cfg = onnxq.QuantConfig(weight_bits=bits, first_last_bits=None, weight_symmetric=False).to_config()
    res = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, cfg.replace(kernels="int32"))
    assert check_target(res.model, "ort-cpu") == []
    if bits == 8 and saturates("auto"):  # unfitted 8-bit codes on an x86 CPU without VNNI: the validator says so
        assert not res.validation.ok and "--kernels portable" in res.validation.reason
    else:
        assert res.validation.ok
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    weights = _weights(res.model)
    assert weights and any(np.any(z != 0) for _, _, z in weights.values())
    for name, (codes, _, zp) in weights.items():
        assert codes.min() >= lo and codes.max() <= hi
        # minmax per channel: each channel's extreme codes sit at the grid's ends (or at the zero-point)
        flat = codes.reshape(codes.shape[0], -1) if codes.ndim > 1 else codes[None]
        assert np.all((flat.min(axis=1) == lo) | (flat.max(axis=1) == hi)), name
    sym = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, onnxq.QuantConfig(weight_bits=bits, first_last_bits=None))
    feed = calib[0]
    ref = run_ort(onnx.load(MODELS / "tiny_cnn.onnx"), feed)[0]
    err = lambda m: float(np.mean((run_ort(m, feed)[0] - ref) ** 2))  # noqa: E731
    if bits == 4:  # a finer grid per channel: lower output error than symmetric at 4 bits
        assert err(res.model) < err(sym.model)


def test_targets_that_need_symmetric_weights_refuse_it():
    with pytest.raises(UserError, match="symmetric weights.*--weight-asymmetric"):
        resolve_config(onnxq.QuantConfig(target="tensorrt", weight_symmetric=False))
    assert not resolve_config(onnxq.QuantConfig(weight_symmetric=False)).weights.symmetric


def test_reconstruction_and_tuning_keep_the_zero_points(calib):
    cfg = onnxq.QuantConfig(weight_bits=4, first_last_bits=None, weight_symmetric=False, method="brecq",
                            recon_iters=8, recon_samples=16, recon_batch_size=8, stats_tuning=True)
    res = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, cfg)
    assert res.validation.ok and res.report["reconstruction"]["improved_blocks"] > 0
    rtn = _weights(onnxq.quantize(MODELS / "tiny_cnn.onnx", calib,
                                  onnxq.QuantConfig(weight_bits=4, first_last_bits=None, weight_symmetric=False)).model)
    for name, (codes, _, zp) in _weights(res.model).items():
        np.testing.assert_array_equal(zp, rtn[name][2], err_msg=name)
        assert np.max(np.abs(codes - rtn[name][0])) <= 1, name
