"""ReconstructPass end to end on the bundled tiny CNN: simulation = onnxruntime, resume, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

import onnxq
from onnxq.blocks.build import build_block
from onnxq.blocks.partition import partition
from onnxq.core import graph as g
from onnxq.core.pass_infra import PassManager
from onnxq.data.capture import capture
from tests.helpers import prepare_float, recon_config

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 4]} for i in range(0, 48, 4)]


def _config(**kw) -> onnxq.QuantConfig:
    base = dict(weight_bits=4, activation_bits=4, method="brecq", recon_iters=8, recon_samples=16,
                recon_batch_size=8, validate=False)
    base.update(kw)
    return onnxq.QuantConfig(**base)


def _rtn_graph(calib, config: onnxq.QuantConfig):
    reference, ctx = prepare_float(g.load_model(MODELS / "tiny_cnn.onnx"), config)
    ctx.calib, ctx.reference = calib, reference
    graph = g.to_graph(reference)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    return graph, ctx


def test_block_simulation_equals_onnxruntime(calib):
    """The torch module the engine trains computes what onnxruntime computes on the QDQ file."""
    graph, ctx = _rtn_graph(calib, _config())
    model = g.to_model(graph)
    blocks = partition(graph)
    assert len(blocks) >= 3
    for block in blocks:
        built = build_block(graph, block, ctx, rounding=False, learn_scales=False)
        values: dict[str, list[np.ndarray]] = {}
        capture(model, [*block.inputs, *block.outputs], calib[:2],
                lambda n, v: values.setdefault(n, []).append(v))
        xs = [torch.from_numpy(np.concatenate(values[n])) for n in block.inputs]
        with torch.no_grad():
            got = built.module(*xs)
        for name, out in zip(block.outputs, got):
            ref = np.concatenate(values[name])
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                       err_msg=block.name)


@pytest.fixture(scope="module")
def brecq(calib, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ck") / "ckpt"
    result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt), validate=True))
    return result, ckpt


def test_brecq_beats_round_to_nearest_and_validates(calib, brecq):
    result, ckpt = brecq
    rec = result.report["reconstruction"]
    assert rec["blocks"] and all(b["loss_final"] <= b["loss_rtn"] or not b["kept"] for b in rec["blocks"])
    assert any(b["kept"] for b in rec["blocks"])
    assert result.validation.ok
    assert not ckpt.exists()  # a finished run removes its checkpoint
    # Reconstructed codes stay on the 4-bit grid and within one step of round-to-nearest.
    rtn = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="rtn"))
    q = {i.name: onnx.numpy_helper.to_array(i).astype(np.int64) for i in result.model.graph.initializer}
    r = {i.name: onnx.numpy_helper.to_array(i).astype(np.int64) for i in rtn.model.graph.initializer}
    changed = 0
    for name, codes in q.items():
        if name.endswith("_quantized") and name in r and "bias" not in name:
            assert np.max(np.abs(codes - r[name])) <= 1, name
            changed += int(np.sum(codes != r[name]))
    assert changed > 0


def test_adaround_is_layer_wise(calib):
    result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="adaround", activation_bits=8))
    rec = result.report["reconstruction"]
    assert rec["method"] == "adaround" and rec["blocks"]
    assert all(b["kind"] == "layer" for b in rec["blocks"])


@pytest.mark.parametrize("method,weight_inputs,captured", [
    ("brecq", None, False), ("brecq", "weights_only", True), ("adaround", None, True),
    ("adaround", "quantized", False)])
def test_weight_phase_inputs(calib, monkeypatch, method, weight_inputs, captured):
    """Interleaved BRECQ's weight phase reads the quantized model's block inputs by default (its activation
    phase runs block by block, so later inputs are clipped by learned steps); AdaRound's the weights-only
    ones. (BRECQ's default two-pass order captures its weight pass from the weights-only model itself.)"""
    import dataclasses

    import onnxq.passes.rounding.reconstruct as rp

    import onnxq.api

    seen = []
    real = rp.Carry

    def spy(*args, **kwargs):  # a weights-only carry is the weight phase's inputs
        seen.append(not kwargs["activations"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rp, "Carry", spy)
    cfg = _config(method=method, activation_bits=8, **({"recon_order": "interleaved"} if method == "brecq" else {}))
    config = cfg.to_config()
    if weight_inputs is not None:
        config = config.replace(rounding=dataclasses.replace(config.rounding, weight_inputs=weight_inputs))
    result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, config)
    assert result.report["reconstruction"]["blocks"] and seen and (True in seen) == captured
    with pytest.raises(onnxq.UserError, match="weight_inputs"):
        onnxq.BRECQ.fast(weight_inputs="float")


def test_qdrop_same_seed_gives_identical_bytes(calib):
    a = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="qdrop"))
    b = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(method="qdrop"))
    assert a.report["reconstruction"]["method"] == "qdrop"
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_interrupted_run_resumes_from_last_finished_block(calib, brecq, tmp_path, monkeypatch):
    """Killed in its second block, the run resumes there and ends with the same bytes as an
    uninterrupted run (which also shows that a fixed seed gives the same model twice)."""
    import onnxq.passes.rounding.reconstruct as rp

    reference, _ = brecq
    real = rp.reconstruct_block
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(rp, "reconstruct_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt)))
    assert (ckpt / "state.json").exists()
    monkeypatch.setattr(rp, "reconstruct_block", real)
    resumed = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt)))
    assert resumed.report["reconstruction"]["resumed_blocks"] == 1
    assert resumed.model.SerializeToString() == reference.model.SerializeToString()


def test_kept_checkpoint_lets_a_rerun_add_tuning_without_reconstructing(calib, brecq, tmp_path, monkeypatch):
    """keep_checkpoint leaves a finished run's blocks on disk; a re-run with statistics tuning on top
    reconstructs nothing and gives the same bytes as a direct run with tuning."""
    import onnxq.passes.rounding.reconstruct as rp

    reference, _ = brecq
    ckpt = tmp_path / "kept"
    first = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt), keep_checkpoint=True))
    assert first.model.SerializeToString() == reference.model.SerializeToString()
    assert (ckpt / "state.json").exists()

    def forbidden(*args, **kwargs):
        raise AssertionError("a kept checkpoint must make reconstruction unnecessary")

    monkeypatch.setattr(rp, "reconstruct_block", forbidden)
    tuned = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib,
                           _config(checkpoint_dir=str(ckpt), keep_checkpoint=True, stats_tuning=True))
    rec = tuned.report["reconstruction"]
    passes = 2 if rec["order"] == "two_pass" else 1  # BRECQ's default: a weight and an activation pass
    assert rec["resumed_blocks"] == passes * len(rec["blocks"]) > 0
    monkeypatch.undo()
    direct = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(stats_tuning=True))
    assert tuned.model.SerializeToString() == direct.model.SerializeToString()
    assert tuned.model.SerializeToString() != reference.model.SerializeToString()


def test_checkpoint_of_other_code_is_not_reused(calib, brecq, tmp_path, monkeypatch):
    """Blocks written by another onnxq (another version, or a working tree edited since) are
    reconstructed again: mixing them with new blocks gave a silently worse model."""
    import onnxq.blocks.checkpoint as rc

    reference, _ = brecq
    ckpt = tmp_path / "kept"
    onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt), keep_checkpoint=True))
    same = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt), keep_checkpoint=True))
    assert same.report["reconstruction"]["resumed_blocks"] > 0
    monkeypatch.setattr(rc, "code_fingerprint", lambda: "another onnxq")
    other = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(checkpoint_dir=str(ckpt)))
    assert other.report["reconstruction"]["resumed_blocks"] == 0
    assert other.model.SerializeToString() == reference.model.SerializeToString()


def test_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    import onnxq.blocks.checkpoint as rc

    first = rc.code_fingerprint()
    assert first == rc.code_fingerprint() and len(first) == 64
    fake = tmp_path / "onnxq"
    fake.mkdir()
    (fake / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(rc, "package_roots", lambda: [("onnxq", fake)])
    rc.code_fingerprint.cache_clear()
    try:
        one = rc.code_fingerprint()
        (fake / "__init__.py").write_text("x = 2\n")
        rc.code_fingerprint.cache_clear()
        assert rc.code_fingerprint() != one != first
    finally:
        monkeypatch.undo()
        rc.code_fingerprint.cache_clear()
    assert rc.code_fingerprint() == first


def test_keep_checkpoint_needs_a_folder():
    with pytest.raises(onnxq.UserError, match="checkpoint_dir"):
        _config(keep_checkpoint=True)


def test_learned_scales_keep_one_tensor_per_name(calib):
    """A learned activation scale is written once and shared by its Q and DQ (unique names)."""
    from onnxq.blocks.build import set_activation_scale

    graph, ctx = _rtn_graph(calib, _config())
    t = next(n.inputs[0].name for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name in ctx.qparams)
    set_activation_scale(graph, ctx, t, ctx.qparams[t].scale * 1.5)
    users = [n.inputs[1] for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")
             and n.inputs[1].name == t + "_scale"]
    assert len(users) >= 2 and all(u is users[0] for u in users)
    model = g.to_model(graph)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))
    onnx.checker.check_model(model, full_check=True)


def test_round_lr_reaches_the_engine_and_bad_values_are_refused():
    """``recon_round_lr`` overrides the schedule's Adam rate of V (fast 5e-2, paper 1e-3)."""
    assert recon_config(onnxq.QuantConfig(weight_bits=4, method="brecq")).round_lr == 5e-2
    assert recon_config(onnxq.QuantConfig(weight_bits=4, method="brecq", schedule="paper")).round_lr == 1e-3
    got = recon_config(onnxq.QuantConfig(weight_bits=4, method="qdrop", recon_round_lr=0.01))
    assert got.round_lr == 0.01
    for bad in (0, -1e-3, float("inf"), float("nan"), True, "0.01"):
        with pytest.raises(onnxq.UserError, match="round_lr"):
            onnxq.QuantConfig(weight_bits=4, method="brecq", recon_round_lr=bad)
