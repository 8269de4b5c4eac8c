"""AdaQuantPass end to end on the bundled tiny CNN: both modes beat round-to-nearest, the output validates,
a fixed seed gives identical bytes, INT32 biases are exactly the trained biases at the final scales; CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass
from onnxq.passes.rounding.adaquant import AdaQuantPass

import onnxq
from onnxq.cli import main
from onnxq.core import graph as g
from onnxq.core.pass_infra import PassManager
from tests.helpers import adaquant_config, one_torch_thread, prepare_float

MODELS = Path(__file__).resolve().parents[1] / "models"


_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 8]} for i in range(0, 48, 8)]


@pytest.fixture(scope="module")
def holdout() -> list[dict[str, np.ndarray]]:
    return [{"input": np.load(MODELS / "tiny_cnn_calib.npz")["input"][48:]}]


@pytest.fixture(scope="module")
def eval_x() -> np.ndarray:
    return np.load(MODELS / "tiny_cnn_eval.npz")["input"][:100].astype(np.float32) / 255


def _config(**kw) -> onnxq.QuantConfig:
    base = dict(weight_bits=4, activation_bits=8, method="adaquant", recon_iters=30, recon_samples=48,
                recon_batch_size=16, validate=False)
    base.update(kw)
    return onnxq.QuantConfig(**base)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def runs(calib, holdout):
    out = {"rtn": onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="rtn"), validation=holdout)}
    for mode in ("parallel", "sequential"):
        cfg = _config(adaquant_mode=mode, validate=True)
        out[mode] = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, cfg, validation=holdout)
    return out


def test_both_modes_beat_round_to_nearest_and_validate(runs, eval_x):
    ref = _logits(onnx.load(str(MODELS / "tiny_cnn.onnx")), eval_x)
    err = {k: float(np.mean((_logits(r.model, eval_x) - ref) ** 2)) for k, r in runs.items()}
    assert err["parallel"] < 0.9 * err["rtn"] and err["sequential"] < 0.9 * err["rtn"], err
    for mode in ("parallel", "sequential"):
        rec = runs[mode].report["reconstruction"]
        assert rec["method"] == "adaquant" and rec["mode"] == mode
        assert all(b["kind"] == "layer" for b in rec["blocks"])
        assert len(rec["blocks"]) == 6  # every weighted op, the first one too
        assert all(b["loss_final"] < b["loss_rtn"] for b in rec["blocks"] if b["kept"])
        assert rec["improved_blocks"] >= 2
        assert runs[mode].validation.ok
        onnx.checker.check_model(runs[mode].model, full_check=True)


@pytest.fixture(scope="module")
def short(calib, holdout):
    """A short sequential W4A4 run (learned zero-points too), the reference of the two tests below."""
    cfg = _config(recon_iters=6, activation_bits=4, calib_method="mse")
    return cfg, onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, cfg, validation=holdout)


def test_same_seed_gives_identical_bytes(calib, holdout, short):
    cfg, a = short
    b = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, cfg, validation=holdout)
    assert a.report["reconstruction"]["improved_blocks"] > 0
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_interrupted_run_resumes_to_the_same_bytes(calib, holdout, short, tmp_path, monkeypatch):
    """Killed in its fourth layer, the run resumes there (trained float weights, learned zero-points and
    scales restored from the checkpoint) and ends with the bytes of an uninterrupted run."""
    import onnxq.passes.rounding.adaquant as pa

    cfg, reference = short
    real = pa.optimize_layer
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(pa, "optimize_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, replace(cfg, checkpoint_dir=str(ckpt)),
                       validation=holdout)
    assert (ckpt / "state.json").exists()
    monkeypatch.setattr(pa, "optimize_layer", real)
    resumed = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, replace(cfg, checkpoint_dir=str(ckpt)),
                             validation=holdout)
    assert resumed.report["reconstruction"]["resumed_blocks"] == 3
    assert resumed.model.SerializeToString() == reference.model.SerializeToString()
    assert not ckpt.exists()


def _rtn_graph(calib, config: onnxq.QuantConfig):
    reference, ctx = prepare_float(g.load_model(MODELS / "tiny_cnn.onnx"), config)
    ctx.calib, ctx.reference = calib, reference
    graph = g.to_graph(reference)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    return graph, ctx


def test_weights_biases_and_scales_are_written_back_exactly(calib):
    """Codes = round(W'/s_w) of the stored trained weight; INT32 bias = round(b'/(s_in s_w)) with the final
    scales, its scale exactly s_in * s_w in float32; learned input steps are in the graph."""
    cfg = _config(activation_bits=4, calib_method="mse", recon_iters=12)
    graph, ctx = _rtn_graph(calib, cfg)
    before = {k: v.copy() for k, v in ctx.float_weights.items()}
    scales_before = {k: ctx.qparams[k].scale.copy() for k in ctx.qparams}
    PassManager([AdaQuantPass(adaquant_config(cfg)), CleanupPass()])(graph, ctx)
    consts = {t.name: np.asarray(t.values) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    biased = [n for n in graph.nodes if n.op in ("Conv", "Gemm") and len(n.inputs) > 2]
    assert biased
    checked = 0
    for node in biased:
        x_dq, w_dq, b_dq = (t.inputs[0] for t in node.inputs[:3])
        q = x_dq.inputs[0].inputs[0]
        q = q.inputs[0].inputs[0] if q.op == "Clip" else q  # QCDQ: Q -> Clip -> DQ
        t = q.inputs[0].name
        w, b = w_dq.inputs[0].name[: -len("_quantized")], b_dq.inputs[0].name[: -len("_quantized")]
        s_in, s_w = np.asarray(x_dq.inputs[1].values), consts[w + "_scale"]
        assert np.array_equal(s_in, ctx.qparams[t].scale) and np.array_equal(s_w, ctx.qparams[w].scale)
        s_b = (s_w.astype(np.float32) * np.float32(s_in)).astype(np.float32)
        assert np.array_equal(consts[b + "_scale"], s_b)
        expect = np.clip(np.rint(ctx.float_weights[b].astype(np.float64) / s_b), -(2**31 - 1), 2**31 - 1)
        assert consts[b + "_quantized"].dtype == np.int32
        assert np.array_equal(consts[b + "_quantized"], expect.astype(np.int32)), node.name
        shape = [-1] + [1] * (ctx.float_weights[w].ndim - 1)
        codes = np.clip(np.round(ctx.float_weights[w] / s_w.reshape(shape)), -8, 7)
        if ctx.qparams[w].spec.bits == 4:
            assert np.array_equal(consts[w + "_quantized"].astype(np.int64), codes), node.name
        checked += 1
    assert checked >= 3
    moved = {k for k in before if not np.array_equal(before[k], ctx.float_weights[k])}
    biases = {b_dq.inputs[0].name[: -len("_quantized")] for b_dq in (n.inputs[2].inputs[0] for n in biased)}
    assert moved & biases and moved - biases  # trained biases and weights are stored
    assert any(not np.array_equal(scales_before[k], ctx.qparams[k].scale) for k in scales_before
               if k in ctx.specs and k not in ctx.float_weights)  # a learned activation step
    onnx.checker.check_model(g.to_model(graph), full_check=True)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"][:24]
    np.savez(tmp_path / "calib.npz", input=x)
    return tmp_path


def test_cli_runs_adaquant_and_mrecg_flags(workdir, capsys):
    model, calib = str(MODELS / "tiny_cnn.onnx"), str(workdir / "calib.npz")
    out = workdir / "a.onnx"
    code, text, err = _cli(capsys, "quantize", model, "-o", str(out), "--calib", calib, "--batch-size", "8",
                           "--weights", "int4", "--method", "adaquant", "--adaquant-mode", "parallel",
                           "--iters", "3", "--recon-samples", "16", "--no-validate")
    assert code == 0, err
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["config"]["rounding"]["mode"] == "parallel" and rep["reconstruction"]["mode"] == "parallel"
    assert not Path(str(out) + ".ckpt").exists()
    out2 = workdir / "m.onnx"
    code, _, err = _cli(capsys, "quantize", model, "-o", str(out2), "--calib", calib, "--batch-size", "8",
                        "--weights", "int4", "--method", "mrecg", "--mrecg-k", "1", "--mrecg-base", "qdrop",
                        "--mrecg-capacity", "proxy", "--mrecg-iters", "per_block", "--iters", "2",
                        "--recon-samples", "8", "--no-validate")
    assert code == 0, err
    rep = json.loads(out2.with_suffix(".report.json").read_text())
    assert rep["config"]["rounding"]["mrecg"]["k"] == 1 and rep["mrecg"]["base"] == "qdrop"
    assert rep["config"]["rounding"]["mrecg"]["iters"] == "per_block" and rep["mrecg"]["final_pass"]["per"] == "block"
    assert len(rep["mrecg"]["merges"]) == 1
    assert out2.with_suffix(".mrecg.png").exists() and rep["mrecg"]["plot"].endswith("m.mrecg.png")


@pytest.mark.parametrize("flags,fragment", [
    (["--method", "adaquant", "--adaquant-mode", "both"], "--adaquant-mode"),
    (["--method", "mrecg", "--mrecg-k", "two"], "--mrecg-k"),
    (["--method", "mrecg", "--mrecg-k", "-1"], "rounding.mrecg.k"),
    (["--method", "mrecg", "--mrecg-base", "adaround"], "--mrecg-base"),
    (["--method", "mrecg", "--mrecg-capacity", "oracle"], "--mrecg-capacity"),
    (["--method", "mrecg", "--mrecg-iters", "per_layer"], "--mrecg-iters"),
    (["--method", "brecq", "--mrecg-base", "qdrop"], "--mrecg-base applies to --method mrecg"),
])
def test_cli_bad_values_are_one_line_errors(workdir, capsys, flags, fragment):
    out = workdir / "bad.onnx"
    code, _, err = _cli(capsys, "quantize", str(MODELS / "tiny_cnn.onnx"), "-o", str(out), "--calib",
                        str(workdir / "calib.npz"), *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:") and fragment in lines[0], err
    assert not out.exists()
