"""AlignScalesPass: Concat / Add inputs share one grid where the target wants it; only ctx.qparams changes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.align_scales import AlignScalesPass, union_qparams
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

from onnxq.config.legacy import QuantConfig
from onnxq.core.graph import to_graph, to_model
from onnxq.core.pass_infra import PassManager
from onnxq.core.spec import INT8_ACT, UINT8_ACT, QuantSpec, ScaleKind, is_power_of_two, qparams_from_range
from onnxq.targets.profiles import get_target, resolve_config
from onnxq.targets.rules import check_target
from tests.helpers import make_context, make_model, random_feeds, run_ort

# Two branches of very different ranges (w2 is scaled by 10) meet in a Concat (followed by a MaxPool,
# whose output shares the Concat's grid) and in an Add.
NET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,2,4,4] y, float[N,4,8,8] z)
  <float[4,3,1,1] w1, float[4,3,1,1] w2, float[2,8,1,1] w3> {
    c1 = Conv (x, w1)
    c2 = Conv (x, w2)
    r2 = Relu (c2)
    k = Concat <axis=1> (c1, r2)
    p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (k)
    y = Conv (p, w3)
    s = Add (c1, r2)
    z = Relu (s)
}"""


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    w2 = 10 * rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    return onnx.shape_inference.infer_shapes(make_model(NET, w1=w1, w2=w2))


def _run(target: str, align: bool = True, insert: bool = False):
    model = _model()
    config = resolve_config(QuantConfig(target=target))
    ctx = make_context(config=config, target=get_target(target),
                       calib=[random_feeds(model, seed=i, batch=4) for i in range(4)])
    graph = to_graph(model)
    passes = [AssignSpecsPass(), CalibratePass()] + ([AlignScalesPass()] if align else [])
    if insert:
        passes += [InsertQDQPass(), CleanupPass()]
    PassManager(passes)(graph, ctx)
    return model, graph, ctx


def _same(a, b) -> bool:
    return np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def test_concat_inputs_and_output_share_the_widest_pow2_grid():
    _, _, before = _run("npu-pow2", align=False)
    _, _, ctx = _run("npu-pow2")
    q = ctx.qparams
    assert not _same(before.qparams["c1"], before.qparams["r2"])  # calibration alone differs
    assert _same(q["c1"], q["r2"]) and _same(q["c1"], q["k"])
    widest = max(float(before.qparams[n].scale) for n in ("c1", "r2", "k"))
    assert float(q["k"].scale) == widest and is_power_of_two(q["k"].scale)
    assert np.all(q["k"].zero_point == 0)
    # The MaxPool output shares its input's parameters, so it follows the aligned grid.
    assert ctx.shared["p"] == "k" and _same(q["p"], q["k"])
    assert ctx.report["align_scales"]["tensors_changed"] >= 1


def test_add_inputs_aligned_only_when_the_target_says_so():
    _, _, npu = _run("npu-pow2")
    _, _, raw = _run("npu-pow2", align=False)
    assert _same(npu.qparams["c1"], npu.qparams["r2"])  # align_eltwise (and the Concat) tie them
    assert _same(npu.qparams["s"], raw.qparams["s"])  # the Add output keeps its own calibrated grid
    _, _, ov = _run("openvino")  # openvino aligns Concat but not Add: the Add output is untouched too
    assert _same(ov.qparams["s"], _run("openvino", align=False)[2].qparams["s"])
    _, _, cpu = _run("ort-cpu")
    assert not _same(cpu.qparams["c1"], cpu.qparams["r2"])  # ort-cpu aligns nothing
    assert cpu.report["align_scales"] == {"groups": 0, "tensors_changed": 0}


def test_alignment_changes_only_qparams():
    model, graph, ctx = _run("npu-pow2")
    _, graph0, ctx0 = _run("npu-pow2", align=False)
    assert [n.op for n in graph.nodes] == [n.op for n in graph0.nodes]
    assert ctx.specs == ctx0.specs and set(ctx.qparams) == set(ctx0.qparams)
    # The aligned group is recorded as tied (later scale tuning keeps it together); nothing else changes.
    new = {k: v for k, v in ctx.shared.items() if ctx0.shared.get(k) != v}
    assert new and set(new) | set(new.values()) <= {"c1", "r2", "k"}
    assert all(ctx.shared[k] == v for k, v in ctx0.shared.items())


def test_asymmetric_union_covers_every_member():
    a = qparams_from_range(np.float64(-1.0), np.float64(3.0), UINT8_ACT)
    b = qparams_from_range(np.float64(0.0), np.float64(6.0), UINT8_ACT)
    u = union_qparams([a, b])
    lo, hi = float((0 - u.zero_point) * u.scale), float((255 - u.zero_point) * u.scale)
    assert lo <= -1.0 + 1e-6 and hi >= 6.0 - float(u.scale)
    pow2 = QuantSpec(bits=8, signed=False, symmetric=False, scale_kind=ScaleKind.POW2)
    p = union_qparams([qparams_from_range(np.float64(-1.0), np.float64(3.0), pow2),
                       qparams_from_range(np.float64(0.0), np.float64(6.0), pow2)])
    assert is_power_of_two(p.scale)
    s = union_qparams([qparams_from_range(np.float64(-2.0), np.float64(1.0), INT8_ACT),
                       qparams_from_range(np.float64(-0.5), np.float64(0.5), INT8_ACT)])
    assert float(s.scale) == pytest.approx(2.0 / 127) and int(s.zero_point) == 0


@pytest.mark.parametrize("target", ["npu-pow2", "tensorrt", "openvino"])
def test_aligned_model_runs_and_passes_the_concat_and_eltwise_rules(target):
    model, graph, ctx = _run(target, insert=True)
    q = to_model(graph, template=model)
    onnx.checker.check_model(q, full_check=True)
    assert check_target(q, target) == []
    feeds = ctx.calib[0]  # inside the calibrated ranges: only rounding error, no clipping
    for ref, got in zip(run_ort(model, feeds), run_ort(q, feeds)):
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
        assert sqnr > 20, sqnr
    if target != "npu-pow2":
        return
    # Without the pass the same plan breaks the npu-pow2 Concat/Add rules.
    model, graph, _ = _run(target, align=False, insert=True)
    rules = {v.rule for v in check_target(to_model(graph, template=model), target)}
    assert {"concat", "eltwise"} <= rules
