"""BRECQ's two-pass order (the reference's): every block's weights first, then every block's steps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.config import BRECQ, QDrop
from onnxq.recon import AdaRoundWeight, RoundToNearestWeight
from tests.helpers import engine_config, recon_config

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 4]} for i in range(0, 48, 4)]


def _config(**kw) -> onnxq.QuantConfig:
    base = dict(weight_bits=4, activation_bits=4, method="brecq", recon_order="two_pass", recon_iters=8,
                recon_samples=16, recon_batch_size=8, validate=False)
    base.update(kw)
    return onnxq.QuantConfig(**base)


def _codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i).astype(np.int64) for i in model.graph.initializer
            if i.name.endswith("_quantized") and "bias" not in i.name}



@pytest.fixture(scope="module")
def spied(calib):
    """One two-pass run with every engine call and every carried model recorded."""
    import onnxq.passes.rounding.reconstruct as rp

    calls, captures = [], []
    real_block, real_carry = rp.reconstruct_block, rp.Carry

    def block_spy(module, weights, acts, *args, **kwargs):
        fixed = {k: w.codes().numpy().copy() for k, w in weights.items()
                 if isinstance(w, RoundToNearestWeight)}
        learned = any(isinstance(w, AdaRoundWeight) for w in weights.values())
        enabled = [a.enabled for a in module.modules() if hasattr(a, "enabled") and hasattr(a, "scale")]
        calls.append({"desc": kwargs["desc"], "adaround": learned,
                      "fixed": fixed, "acts": len(acts), "enabled": enabled,
                      "quantize_activations": kwargs["quantize_activations"], "iters": args[3].iters,
                      "act_iters": args[3].act_iters, "fp_inputs": args[1] is not None})
        return real_block(module, weights, acts, *args, **kwargs)

    def carry_spy(*args, **kwargs):  # which quantized model's block inputs a pass carries
        captures.append(kwargs["activations"])
        return real_carry(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(rp, "reconstruct_block", block_spy)
    mp.setattr(rp, "Carry", carry_spy)
    try:
        result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(validate=True))
    finally:
        mp.undo()
    return result, calls, captures


def test_all_weight_phases_run_before_any_activation_phase(spied):
    result, calls, _ = spied
    rec = result.report["reconstruction"]
    n = len(rec["blocks"])
    assert rec["order"] == "two_pass" and n >= 3 and len(calls) == 2 * n
    assert all("weights" in c["desc"] for c in calls[:n]) and all("acts" in c["desc"] for c in calls[n:])
    for c in calls[:n]:  # the weight pass: rounding variables, every activation quantizer off, no step phase
        assert c["adaround"] and c["acts"] == 0 and not any(c["enabled"])
        assert c["quantize_activations"] is False and c["act_iters"] == 0 and not c["fp_inputs"]
    for c in calls[n:]:  # the activation pass: fixed weights, enabled quantizers, float-model inputs
        assert not c["adaround"] and c["fixed"] and c["acts"] > 0 and all(c["enabled"])
        assert c["quantize_activations"] is True and c["act_iters"] > 0 and c["fp_inputs"]
    assert result.validation.ok


def test_weight_pass_reads_weights_only_inputs_and_act_pass_the_quantized_model(spied):
    result, calls, captures = spied
    # the weight pass carries the weights-only model (no activation quantizer upstream), the activation
    # pass the fully quantized one
    assert captures == [False, True]


def test_act_pass_keeps_the_codes_the_weight_pass_learned(spied, calib):
    """The activation pass trains on exactly the codes in the output model, and they are not RTN's."""
    result, calls, _ = spied
    n = len(result.report["reconstruction"]["blocks"])
    final = _codes(result.model)
    rtn_config = _config(method="rtn", recon_order=None)
    rtn = _codes(onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, rtn_config).model)
    seen = 0
    changed = 0
    for c in calls[n:]:
        for key, codes in c["fixed"].items():
            name = key.removesuffix("_dequantized") + "_quantized"
            np.testing.assert_array_equal(codes, final[name].reshape(codes.shape), err_msg=name)
            changed += int(np.sum(final[name] != rtn[name]))
            seen += 1
    assert seen > 0 and changed > 0


def test_report_nests_the_weight_pass_in_each_block(spied):
    rec = spied[0].report["reconstruction"]
    for entry in rec["blocks"]:
        assert {"loss_rtn", "loss_final", "kept"} <= set(entry)
        assert {"loss_rtn", "loss_final", "kept"} <= set(entry["weight_phase"])
    assert rec["improved_blocks"] >= 1


def test_interrupted_in_the_activation_pass_resumes_to_the_same_bytes(calib, spied, tmp_path, monkeypatch):
    """Killed in the second block of the activation pass, the run resumes there (the whole weight
    pass and one act block come from the checkpoint) and ends with the bytes of an uninterrupted run."""
    import onnxq.passes.rounding.reconstruct as rp

    real = rp.reconstruct_block
    acts = []

    def dying(*args, **kwargs):
        if "acts" in kwargs["desc"]:
            acts.append(kwargs["desc"])
            if len(acts) == 2:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(rp, "reconstruct_block", dying)
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt)))
    state = json.loads((ckpt / "state.json").read_text())
    n = len(spied[0].report["reconstruction"]["blocks"])
    assert len(state["done"]) == n + 1 and max(state["done"]) >= rp.ACT_PASS_OFFSET
    resumed_calls = []

    def counting(*args, **kwargs):
        resumed_calls.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rp, "reconstruct_block", counting)
    resumed = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt)))
    assert len(resumed_calls) == n - 1 and all("acts" in d for d in resumed_calls)
    assert resumed.report["reconstruction"]["resumed_blocks"] == n + 1
    assert resumed.model.SerializeToString() == spied[0].model.SerializeToString()


def test_order_defaults_and_errors():
    assert engine_config("brecq", "fast").order == "two_pass" and engine_config("brecq").order == "two_pass"
    assert engine_config("brecq", "fast").weight_inputs == "weights_only"
    assert engine_config("brecq", "fast", order="interleaved").weight_inputs == "quantized"
    assert engine_config("adaround", "fast").order == "interleaved"
    assert engine_config("qdrop", "fast").order == "interleaved"
    assert engine_config("brecq", "fast", order="two_pass").weight_inputs == "weights_only"
    assert engine_config("brecq", "fast", order="two_pass", weight_inputs="quantized").weight_inputs == "quantized"
    assert engine_config("qdrop", "fast").weight_inputs == "quantized"
    with pytest.raises(onnxq.UserError, match="a setting of brecq"):
        QDrop.fast(order="two_pass")
    with pytest.raises(onnxq.UserError, match="order"):
        BRECQ.fast(order="reverse")
    with pytest.raises(onnxq.UserError, match="needs method brecq"):
        _config(method="qdrop")
    assert recon_config(_config(method="mrecg", mrecg_base="brecq")).order == "two_pass"
    assert recon_config(replace(_config(), recon_order=None, activation_bits=8)).order == "two_pass"
    assert recon_config(replace(_config(), recon_order=None)).order == "interleaved"  # 4-bit activations
    mrecg = replace(_config(method="mrecg", mrecg_base="brecq"), recon_order=None)
    assert recon_config(mrecg).order == "interleaved"
    assert recon_config(replace(_config(), recon_order="interleaved")).order == "interleaved"


def test_cli_flag(tmp_path, capsys):
    from onnxq.cli import main

    out = tmp_path / "m.q.onnx"
    np.savez(tmp_path / "calib.npz", input=np.load(MODELS / "tiny_cnn_calib.npz")["input"][:16])
    calib_file = str(tmp_path / "calib.npz")
    args = ["quantize", str(MODELS / "tiny_cnn.onnx"), "--calib", calib_file, "--weights", "int4"]
    code = main([*args, "-o", str(out), "--method", "brecq", "--iters", "4", "--act-iters", "1",
                 "--recon-order", "two-pass"])
    capsys.readouterr()
    assert code == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config"]["rounding"]["order"] == "two_pass" and report["reconstruction"]["order"] == "two_pass"
    code = main([*args, "-o", str(tmp_path / "x.onnx"), "--method", "qdrop", "--recon-order", "two-pass"])
    assert code != 0 and "no setting 'order' (a setting of brecq)" in capsys.readouterr().err


def _activation_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    constants = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: onnx.numpy_helper.to_array(constants[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in constants}


def test_no_activation_phase_keeps_the_calibrated_ranges(calib):
    """``recon_act_iters=0``: one weight pass, no step-size learning, so every activation scale is
    the calibrated one (as round-to-nearest writes it) while the weight codes are learned."""
    import onnxq.passes.rounding.reconstruct as rp

    assert recon_config(_config(recon_act_iters=0)).act_iters == 0
    assert recon_config(_config(recon_act_iters=7)).act_iters == 7
    assert recon_config(_config()).act_iters == 2  # a quarter of the 8 weight iterations
    # 8-bit activations on the fast schedule: no step phase by default (it overfits), paper keeps it
    assert recon_config(replace(_config(), activation_bits=8)).act_iters == 0
    assert recon_config(replace(_config(), activation_bits=8, recon_act_iters=3)).act_iters == 3
    assert recon_config(replace(_config(), activation_bits=8, schedule="paper")).act_iters == 2
    assert recon_config(replace(_config(), activation_bits=8, method="qdrop", recon_order=None)).act_iters == 0
    with pytest.raises(onnxq.UserError, match="act_iters"):
        _config(recon_act_iters=-1)
    for method in ("qdrop", "adaround", "rtn"):  # no activation phase to size: an error, not ignored
        with pytest.raises(onnxq.UserError, match="has none"):
            _config(method=method, recon_order=None, recon_act_iters=3)
    assert recon_config(_config(method="mrecg", mrecg_base="brecq", recon_act_iters=3)).act_iters == 3
    calls = []
    real = rp.reconstruct_block
    mp = pytest.MonkeyPatch()
    mp.setattr(rp, "reconstruct_block", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    try:
        result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(recon_act_iters=0))
    finally:
        mp.undo()
    rec = result.report["reconstruction"]
    assert rec["act_iters"] == 0 and rec["order"] == "weights_only"
    assert len(calls) == len(rec["blocks"]) and not any("acts" in c for c in calls)
    rtn = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="rtn", recon_order=None)).model
    got, want = _activation_scales(result.model), _activation_scales(rtn)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert rec["improved_blocks"] >= 1
    # with a step phase long enough to beat the calibrated steps on this tiny model (2 steps do not)
    learned = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(recon_act_iters=8)).model
    assert any(not np.array_equal(s, want[n]) for n, s in _activation_scales(learned).items())
