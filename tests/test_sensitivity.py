"""Per-layer sensitivity: table structure, agreement with a real quantization of the plan, Fisher math."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxq.api import quantize
from onnxq.config.legacy import QuantConfig
from onnxq.core.observers import weight_qparams
from onnxq.core.spec import Granularity, QuantSpec, fake_quantize
from onnxq.errors import UserError
from onnxq.mixed.sensitivity import measure_sensitivity
from tests.helpers import make_model, one_torch_thread, run_ort

MODEL = "models/tiny_cnn.onnx"
_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def _calib(n: int = 64, batch: int = 16) -> list[dict[str, np.ndarray]]:
    x = np.load("models/tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + batch]} for i in range(0, n, batch)]


def _holdout() -> list[dict[str, np.ndarray]]:
    x = np.load("models/tiny_cnn_eval.npz")["input"][:32].astype(np.float32) / 255.0
    return [{"input": x[:16]}, {"input": x[16:]}]


@pytest.fixture(scope="module")
def table():
    return measure_sensitivity(MODEL, _calib(), QuantConfig(validate=False), holdout=_holdout(),
                               metric=lambda out: float(np.mean(out.argmax(axis=1) == 0)))


def test_table_structure(table):
    names = [i.name for i in table.layers]
    assert names[0] == "/features/features.0/Conv" and names[-1] == "/fc/Gemm"
    assert table.layers[0].fixed_bits == 8 and table.layers[-1].fixed_bits == 8
    assert all(i.fixed_bits is None for i in table.layers[1:-1])
    assert table.widths == (8, 4, 2) and table.holdout_samples == 32
    assert set(table.measures) == {"mse", "cosine", "metric"}
    for info in table.layers[1:-1]:
        row = table.values[info.name]
        assert row[8] == table.base  # one layer at 8 bits is the base model
        assert row[2]["mse"] > row[4]["mse"] > row[8]["mse"] > 0
        assert table.cost(info.name, 8) == 0.0 and table.cost(info.name, 2) > table.cost(info.name, 4) > 0
    gemm = table.layer("/fc/Gemm")
    assert gemm.macs == gemm.params == 320 and gemm.act_bits == 8
    conv = table.layer("/features/features.5/Conv")
    assert conv.macs == conv.params * 8 * 8  # 8x8 output positions


def test_swapped_layer_matches_quantizing_its_plan(table):
    """The table's value for (layer, 4 bits) is the output error of quantize() with that plan."""
    name = "/features/features.3/body/body.3/Conv"
    holdout = _holdout()
    result = quantize(MODEL, _calib(), QuantConfig(bit_plan={name: 4}, validate=False), validation=holdout)
    ref = onnx.load(MODEL)
    errs = [np.mean((run_ort(result.model, f, "disable")[0].astype(np.float64)
                     - run_ort(ref, f)[0].astype(np.float64)) ** 2) for f in holdout]
    np.testing.assert_allclose(np.mean(errs), table.values[name][4]["mse"], rtol=0.02)


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="candidate width"):
        measure_sensitivity(MODEL, _calib(), widths=(8, 3))
    one = make_model("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6] x) => (float[N,5] y) <float[5,6] w, float[5] b> {
            y = Gemm <transB=1> (x, w, b)
        }""")
    feeds = [{"x": np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(UserError, match="no quantized weighted layer"):
        measure_sensitivity(one, feeds, QuantConfig(validate=False))


def test_fisher_matches_the_analytic_diagonal_fisher(monkeypatch):
    """For logits z = W x + b the sampled-label Fisher of z is p (1 - p); fisher(l, 4) must be
    1/2 mean_x sum_k p_k (1 - p_k) dz_k^2 with dz = (W_4 - W) x."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    b = (0.1 * rng.standard_normal(5)).astype(np.float32)
    model = make_model("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6] x) => (float[N,5] y) <float[5,6] w, float[5] b> {
            y = Gemm <transB=1> (x, w, b)
        }""", w=w, b=b)
    calib = [{"x": rng.standard_normal((64, 6)).astype(np.float32)}]
    holdout = [{"x": rng.standard_normal((1000, 6)).astype(np.float32)} for _ in range(3)]
    monkeypatch.setattr("onnxq.mixed.fisher.CHUNK", 1000)
    t = measure_sensitivity(model, calib, QuantConfig(validate=False, first_last_bits=None), widths=(8, 4),
                            holdout=holdout, fisher=True)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity=Granularity.CHANNEL, axis=0)
    dw = fake_quantize(w, weight_qparams(w, spec)).astype(np.float64) - w
    x = np.concatenate([h["x"] for h in holdout]).astype(np.float64)
    z = x @ w.T.astype(np.float64) + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = x @ dw.T
    expected = 0.5 * np.mean(np.sum(p * (1 - p) * dz**2, axis=1))
    got = t.values[t.layers[0].name][4]["fisher"]
    assert got == pytest.approx(expected, rel=0.08)
    assert t.values[t.layers[0].name][8]["fisher"] < 0.01 * got  # 8 bits: much smaller


def test_calibrated_model_matches_quantize():
    """One calibration, many plans: the same constants as onnxq.quantize with that plan."""
    from onnxq.data.loaders import load_calibration, model_inputs
    from onnxq.pipeline.calibrated import CalibratedModel
    from onnxq.targets.profiles import resolve_config

    plan = (("/features/features.3/body/body.0/Conv", 4), ("/features/features.5/Conv", 2))
    config = resolve_config(QuantConfig(bit_plan=plan, validate=False))
    original = onnx.load(MODEL)
    cal = CalibratedModel.build(original, config, load_calibration(_calib(), model_inputs(original)))
    fast = cal.quantize(plan)
    slow = quantize(MODEL, _calib(), config, validation=_holdout()).model
    a = {i.name: onnx.numpy_helper.to_array(i) for i in fast.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in slow.graph.initializer}
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [n.op_type for n in fast.graph.node] == [n.op_type for n in slow.graph.node]


def _adaquant(mode: str = "parallel"):
    from onnxq.config import AdaQuant

    return AdaQuant.fast(mode=mode, iters=30, batch_size=16, samples=48, holdout=16, eval_samples=16)


def test_adaquant_table_prices_layers_after_reconstruction(table):
    """CalibTIP's table: each width's weights from parallel AdaQuant. The 8-bit base is unchanged,
    the 2-bit damage AdaQuant repairs shrinks, and the table says how it was made."""
    t = measure_sensitivity(MODEL, _calib(), QuantConfig(validate=False), holdout=_holdout(),
                            reconstruct="adaquant", adaquant=_adaquant())
    assert t.reconstruct == "adaquant" and table.reconstruct == "rtn"
    assert t.base["mse"] == pytest.approx(table.base["mse"], rel=1e-6)  # 8 bits: round to nearest in both
    names = [i.name for i in t.layers if i.fixed_bits is None]
    rtn2 = sum(table.cost(n, 2) for n in names)
    aq2 = sum(t.cost(n, 2) for n in names)
    assert aq2 < 0.8 * rtn2, (aq2, rtn2)
    assert any(t.values[n][4]["mse"] != table.values[n][4]["mse"] for n in names)
    again = type(t).from_dict(t.to_dict())
    assert again.reconstruct == "adaquant" and again.values == t.values


def test_adaquant_table_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="reconstruct='adaround' is unknown"):
        measure_sensitivity(MODEL, _calib(), reconstruct="adaround")
    with pytest.raises(UserError, match="needs parallel AdaQuant"):
        measure_sensitivity(MODEL, _calib(), reconstruct="adaquant", adaquant=_adaquant("sequential"))
