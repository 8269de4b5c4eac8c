"""The accuracy target (--max-drop): switch model numerics, the search, the plan file, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.api import quantize
from onnxq.cli import main
from onnxq.config import AccuracyTarget, Config, MixedPrecision
from onnxq.errors import UserError
from onnxq.fallback.plan import FloatPlan
from onnxq.fallback.score import Scorer
from onnxq.fallback.switches import build_switch_model
from onnxq.pipeline.run import prepare_run, quantize_prepared
from tests.helpers import make_model

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'
# One attention layer: LayerNorm with two outlier channels, Q/K/V projections, Softmax, output projection
# and a residual Add; the LayerNorm node is unnamed (its key is "LayerNormalization(h)").
ATTENTION = f"""{HEAD}
    g (float[N,6,16] x) => (float[N,6,16] y)
      <float[16] gamma, float[16] beta, float[16,16] wq, float[16,16] wk, float[16,16] wv, float[16,16] wo> {{
        h = LayerNormalization <axis=-1> (x, gamma, beta)
        q = MatMul (h, wq)
        k = MatMul (h, wk)
        kt = Transpose <perm=[0,2,1]> (k)
        s = MatMul (q, kt)
        p = Softmax <axis=-1> (s)
        v = MatMul (h, wv)
        a = MatMul (p, v)
        o = MatMul (a, wo)
        y = Add (x, o)
    }}"""


def _attention() -> onnx.ModelProto:
    gamma = np.ones(16, np.float32)
    gamma[[3, 11]] = 40.0
    model = make_model(ATTENTION, gamma=gamma, beta=np.full(16, 0.1, np.float32))
    for i, node in enumerate(model.graph.node):
        if node.op_type != "LayerNormalization":
            node.name = f"{node.op_type.lower()}_{i}"
    return model


def _data(n: int, seed: int, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    """``n`` samples in batches of 8."""
    x = (scale * np.random.default_rng(seed).standard_normal((n, 6, 16))).astype(np.float32)
    return [{"x": x[i:i + 8]} for i in range(0, n, 8)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _cosine_drop(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    ref = np.concatenate([_run(model, f)[0].ravel() for f in feeds])
    got = np.concatenate([_run(quantized, f, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0].ravel() for f in feeds])
    return 100.0 * (1.0 - float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)))


def _target(max_drop: float, **kw) -> Config:
    return Config(accuracy=AccuracyTarget(max_drop=max_drop, metric="cosine", **kw))


# ------------------------------------------------------------------------------------- switch model
def test_switch_model_is_the_quantized_model_off_and_an_exclusion_on() -> None:
    model, calib = _attention(), _data(48, 0)
    run = prepare_run(model, calib, Config())
    quantized, ctx = quantize_prepared(run)
    switch = build_switch_model(quantized, ctx.reference)
    keys = {c.key for c in switch.candidates}
    assert "LayerNormalization(h)" not in keys  # reads the graph input float: nothing to switch
    assert {"matmul_1", "matmul_2", "matmul_6", "matmul_8", "add_9"} <= keys, keys
    feeds = _data(8, 9)[0]
    off = _run(switch.model, {**feeds, **switch.feed(frozenset())})
    assert np.array_equal(off[0], _run(quantized, feeds)[0])  # Where passes the quantized value through
    # Keeping the V projection float changes nothing else (h stays quantized for Q and K): the switch is
    # the model quantized with that op excluded.
    one = _run(switch.model, {**feeds, **switch.feed({"matmul_6"})})
    excluded, _ = quantize_prepared(run, replace(run.config, exclude=("matmul_6",)))
    np.testing.assert_allclose(one[0], _run(excluded, feeds)[0], rtol=1e-5, atol=1e-5)
    assert np.abs(one[0] - off[0]).max() > 1e-3
    # The residual Add reads the output projection's integer kernel: kept float, it still reads those codes,
    # so only its graph input x is switched.
    assert [c.inputs for c in switch.candidates if c.key == "add_9"] == [1]


def test_unnamed_nodes_are_excluded_by_their_key() -> None:
    model = _attention()
    result = quantize(model, _data(32, 0), Config(exclude=("LayerNormalization(h)", "softmax_5")))
    assert result.report["float_ops"]["LayerNormalization(h)"] == "excluded by the user"
    with pytest.raises(UserError, match="matches no node name"):
        quantize(model, _data(32, 0), Config(exclude=("Softmax(q)",)))


# ------------------------------------------------------------------------------------- the search
def test_target_is_met_with_few_ops_kept_and_the_plan_round_trips(tmp_path) -> None:
    model, calib = _attention(), _data(64, 0)
    plain = quantize(model, calib, Config())
    held = _data(32, 5)
    plain_drop = _cosine_drop(model, plain.model, held)
    max_drop = plain_drop / 4
    result = quantize(model, calib, _target(max_drop), validation=held)
    target = result.report["accuracy_target"]
    assert target["met_on_search_samples"] and result.validation.ok, result.validation.failures
    kept = [k["node"] for k in target["kept_float"]]
    assert 0 < len(kept) < 6, kept
    for k in target["kept_float"]:  # each op joined because it lowered the drop
        assert k["bought"]["after"] < k["bought"]["before"]
        assert result.report["float_ops"][k["node"]].startswith("kept float for the accuracy target")
    assert target["drop"]["validation"] <= max_drop < target["drop"]["quantized"]
    assert _cosine_drop(model, result.model, held) <= max_drop
    # The written plan, applied again (as --float-plan does), gives the same model without a search.
    path = result.save(tmp_path / "m.onnx")
    plan = FloatPlan.load(tmp_path / "m.floatplan.json")
    assert list(plan.nodes) == kept and path.is_file()
    again = quantize(model, calib, Config(exclude=plan.nodes), validation=held)
    assert again.model.SerializeToString() == result.model.SerializeToString()


def test_activation_ops_only_keeps_every_weighted_op_integer() -> None:
    model, calib = _attention(), _data(64, 0)
    result = quantize(model, calib, _target(0.5, ops="activations"), validation=_data(32, 5))
    kept = {k["node"] for k in result.report["accuracy_target"]["kept_float"]}
    weighted = {"matmul_1", "matmul_2", "matmul_6", "matmul_8"}
    assert not kept & weighted and not weighted & set(result.report["float_ops"])
    assert result.report["accuracy_target"]["rounds"]  # it searched
    if not result.report["accuracy_target"]["met_on_search_samples"]:  # then it fails, saying why
        assert any("accuracy target is not met" in f for f in result.validation.failures)


def test_a_met_target_keeps_nothing() -> None:
    model, calib = _attention(), _data(48, 0)
    result = quantize(model, calib, _target(50.0))
    target = result.report["accuracy_target"]
    assert target["kept_float"] == [] and target["rounds"] == [] and result.float_plan.nodes == ()


def test_met_on_search_but_not_on_validation_fails_validation_with_the_reason(tmp_path) -> None:
    model = _attention()
    # The validation inputs are 100x larger than anything calibrated: every range clips there.
    result = quantize(model, _data(48, 0), _target(0.5), validation=_data(16, 3, scale=100.0))
    assert not result.validation.ok
    assert any("not on the validation samples" in f for f in result.validation.failures), result.validation.failures


def test_cli_writes_the_plan_and_applies_it(tmp_path, capsys) -> None:
    model = _attention()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in _data(64, 0)]))
    args = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--batch-size", "8"]
    assert main(["quantize", *args, "-o", str(tmp_path / "plain.onnx")]) == 0
    assert main(["quantize", *args, "-o", str(tmp_path / "t.onnx"), "--max-drop", "0.5", "--drop-metric",
                 "cosine", "--allow-degraded"]) == 0
    out = capsys.readouterr().out
    assert "t.floatplan.json" in out and "ops kept float" in out
    plan = json.loads((tmp_path / "t.floatplan.json").read_text())
    assert plan["format"] == "onnxq-float-plan" and plan["keep_float"]
    assert main(["quantize", *args, "-o", str(tmp_path / "again.onnx"), "--float-plan",
                 str(tmp_path / "t.floatplan.json"), "--exclude", "softmax_5"]) == 0
    report = json.loads((tmp_path / "again.report.json").read_text())
    excluded = {k for k, v in report["float_ops"].items() if v == "excluded by the user"}
    assert excluded == {*(k["node"] for k in plan["keep_float"]), "softmax_5"}


# ------------------------------------------------------------------------------------- scoring
def test_agreement_is_judged_at_its_confidence_bound_and_auto_picks_it_for_classifiers() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 10))
    scorer = Scorer([[logits]], "auto")
    assert scorer.describe() == {"output 0": "agreement"}
    flipped = logits.copy()
    flipped[0] = -flipped[0]  # one row's top-1 changes
    score = scorer([[flipped]])
    assert score.drop == pytest.approx(100 / 64)
    assert 0 < score.judged < score.drop  # one flip in 64 is within noise of a 0.5-point target
    assert score.meets(0.5) and not Scorer([[logits]], "cosine")([[flipped]]).meets(0.5)
    assert Scorer([[rng.standard_normal((8, 3, 4))]], "auto").describe() == {"output 0": "cosine"}
    same = np.zeros((64, 10))
    same[:, 2] = 1.0  # a constant prediction: agreement says nothing
    assert Scorer([[same]], "auto").describe() == {"output 0": "cosine"}


def test_user_metric_is_the_first_output_score() -> None:
    y = np.linspace(0, 1, 20).reshape(4, 5)
    scorer = Scorer([[y]], "metric", user_metric=lambda out: float(out.sum()))
    assert scorer([[y - 0.01]]).drop == pytest.approx(0.2)
    with pytest.raises(UserError, match="needs a metric callable"):
        Scorer([[y]], "metric")


def test_a_user_metric_scores_the_search_samples_in_order() -> None:
    seen: list[int] = []

    def score(y: np.ndarray) -> float:  # a "label" per search sample: the sign of its first output element
        seen.append(len(y))
        return float(np.mean(np.sign(y[:, 0, 0]) == np.sign(reference[: len(y), 0, 0])))

    model, calib = _attention(), _data(64, 0)
    reference = np.concatenate([_run(model, b)[0] for b in calib[:4]])  # the first 32 samples' float outputs
    config = Config(accuracy=AccuracyTarget(max_drop=100.0, metric="metric", samples=32))
    result = quantize(model, calib, config, metric=score, validation=_data(16, 5))
    assert set(seen) == {32}  # only ever the 32 search samples, never the held-out ones
    assert result.report["accuracy_target"]["drop"]["validation"] is None


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text, match", [
    (None, "does not exist"), ("{not json", "not readable JSON"), ('{"layers": {}}', 'no "keep_float" list'),
    ('{"keep_float": [{"op": "Add"}]}', "entry 0 names no node"),
])
def test_bad_plan_files_are_one_line_errors(tmp_path, text, match) -> None:
    path = tmp_path / "p.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=match):
        FloatPlan.load(path)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="accuracy.max_drop"):
        AccuracyTarget(max_drop=-1.0)
    with pytest.raises(UserError, match="accuracy.metric"):
        AccuracyTarget(metric="top5")
    config = Config(accuracy=AccuracyTarget(max_drop=1.0), mixed_precision=MixedPrecision(enabled=True,
                                                                                            size_budget=0.5))
    with pytest.raises(UserError, match="cannot be combined"):
        quantize(_attention(), _data(16, 0), config)
    with pytest.raises(UserError, match="needs a metric callable"):
        quantize(_attention(), _data(16, 0), replace(_target(1.0), accuracy=AccuracyTarget(max_drop=1.0,
                                                                                          metric="metric")))
    assert Config.from_dict(_target(0.3).to_dict()).accuracy == _target(0.3).accuracy
