"""MRECG: merge selection (adjacent, non-overlapping, at most k, chains <= 3), merged units simulate as
onnxruntime runs them, end-to-end quantization on the tiny CNN, the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

import onnxq
from onnxq.blocks.build import build_block
from onnxq.blocks.mrecg_plan import (
    differentials,
    eligible_boundaries,
    merge_blocks,
    merged_partition,
    plan_merges,
    proxy_capacity,
    select_boundaries,
)
from onnxq.blocks.partition import Block, partition
from onnxq.core import graph as g
from onnxq.core.pass_infra import PassManager
from onnxq.data.capture import capture
from onnxq.errors import UserError
from tests.helpers import make_model, mrecg_iters, one_torch_thread, prepare_float, without_floors

MODELS = Path(__file__).resolve().parents[1] / "models"

CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,4] y{extra}) <float[6,3,3,3] w1, float[6] b1, float[6,6,3,3] w2,
    float[6] b2, float[6,6,1,1] w3, float[6] b3, float[6,6,3,3] w4, float[6] b4, float[6,4] wf> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
    mid = Relu (c2)
    c3 = Conv (mid, w3, b3)
    r3 = Relu (c3)
    c4 = Conv <pads=[1,1,1,1], strides=[2,2]> (r3, w4, b4)
    r4 = Relu (c4)
    p = GlobalAveragePool (r4)
    f = Flatten (p)
    y = MatMul (f, wf)
}"""


_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def _rtn(model, feeds, **kw):
    cfg = onnxq.QuantConfig(**{"weight_bits": 4, "activation_bits": 4, "validate": False, **kw})
    reference, ctx = prepare_float(model, cfg)
    ctx.calib, ctx.reference = feeds, reference
    graph = g.to_graph(reference)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    return graph, ctx


@pytest.fixture(scope="module")
def tiny_calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 4]} for i in range(0, 48, 4)]


def _chain(extra: str = ""):
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    graph, ctx = _rtn(make_model(CHAIN.replace("{extra}", extra), seed=3), feeds)
    return graph, ctx, feeds


@pytest.fixture(scope="module")
def chain():
    """Conv-Relu x4, pooling, MatMul: five one-layer blocks with max_chain=1."""
    return _chain()


def _chains(boundaries: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in sorted(boundaries):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 100, allow_nan=False)), min_size=0, max_size=14),
       st.integers(0, 8))
def test_selection_is_top_k_adjacent_and_chains_of_at_most_three(diffs, k):
    picked = select_boundaries(diffs, k)
    assert len(picked) <= k and len(set(picked)) == len(picked)
    assert all(diffs[i] is not None for i in picked)
    assert all(len(run) + 1 <= 3 for run in _chains(picked))  # a run of r boundaries joins r + 1 blocks
    valid = [i for i, d in enumerate(diffs) if d is not None]
    if valid and k:
        assert picked[0] == max(valid, key=lambda i: (diffs[i], -i))  # the largest D always merges
    if len(picked) < k:  # stopped early only because every remaining boundary would make a chain of 4
        for i in valid:
            if i not in picked:
                assert any(len(run) + 1 > 3 for run in _chains([*picked, i]))


def test_plan_groups_cover_blocks_in_order_and_skip_ineligible():
    blocks = [Block(i, f"block{i:02d}:chain(n{i})", "chain", (f"n{i}",), (f"t{i}",), (f"t{i + 1}",), (), ())
              for i in range(7)]
    caps = [None, 1.0, 9.0, 10.0, 2.0, 2.5, 30.0]  # block 0 not reconstructed (first layer)
    plan = plan_merges(blocks, caps, k=3)
    assert plan.differentials[0] is None and plan.differentials[5] == pytest.approx(27.5)
    assert plan.boundaries == (5, 1, 3)  # D = 27.5, 8, 8 (tie: earlier first), then 1 and 0.5 not needed
    assert plan.groups == ((0,), (1, 2), (3, 4), (5, 6))
    assert plan.merges == [(1, 2), (3, 4), (5, 6)]
    # a boundary where the second block does not read the first is never eligible
    stranger = Block(3, "block03:chain(x)", "chain", ("x",), ("other",), ("t4",), (), ())
    broken = [*blocks[:3], stranger, *blocks[4:]]
    assert eligible_boundaries(broken, [True] * 7)[2] is False
    assert differentials([1.0, 10.0], [True], log_scale=True)[0] == pytest.approx(np.log(10.0))
    with pytest.raises(UserError):
        select_boundaries([1.0], -1)


def _check_simulation(graph, ctx, feeds, units: list[Block]) -> None:
    model = g.to_model(graph)
    for unit in units:
        built = build_block(graph, unit, ctx, rounding=False, learn_scales=False)
        values: dict[str, list[np.ndarray]] = {}
        capture(model, [*unit.inputs, *unit.outputs], feeds, lambda n, v: values.setdefault(n, []).append(v))
        xs = [torch.from_numpy(np.concatenate(values[n])) for n in unit.inputs]
        with torch.no_grad():
            got = built.module(*xs)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(unit.outputs)
        for name, out in zip(unit.outputs, got, strict=True):
            ref = np.concatenate(values[name])
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                       err_msg=unit.name)


def test_merged_units_simulate_exactly_as_onnxruntime(chain):
    """Merged pairs and a triple computed in torch equal onnxruntime on the QDQ model, so one loss at the
    unit's output is the real one."""
    graph, ctx, feeds = chain
    blocks = partition(graph, max_chain=1)
    assert [len(b.weighted_ops) for b in blocks] == [1] * 5
    units = [*merged_partition(graph, blocks, [[0], [1, 2, 3], [4]]), merge_blocks(graph, blocks[0:2], 0),
             merge_blocks(graph, blocks[3:5], 0)]
    triple = units[1]
    assert triple.kind == "merged" and triple.index == 1 and triple.name.startswith("block01:merged(")
    assert triple.inputs == blocks[1].inputs and triple.outputs == blocks[3].outputs
    assert triple.weighted_ops == tuple(o for b in blocks[1:4] for o in b.weighted_ops)
    assert set(triple.nodes) == {n for b in blocks[1:4] for n in b.nodes}
    _check_simulation(graph, ctx, feeds, units)


def test_merged_unit_keeps_an_inner_output_read_outside():
    """An earlier member's output that leaves the unit (here a graph output) stays a unit output."""
    graph, ctx, feeds = _chain(", float[N,6,8,8] mid")
    blocks = partition(graph)
    (i,) = [k for k, b in enumerate(blocks) if b.outputs == ("mid",)]
    merged = merge_blocks(graph, blocks[i:i + 2], 0)
    assert merged.outputs == ("mid", *blocks[i + 1].outputs)
    _check_simulation(graph, ctx, feeds, [merged])


def test_proxy_capacity_is_relative_weight_quantization_noise(chain):
    graph, ctx, _ = chain
    blocks = partition(graph, max_chain=1)
    caps = proxy_capacity(graph, blocks, ctx)
    assert len(caps) == 5 and all(c > 0 for c in caps)
    assert max(caps[0], caps[-1]) * 30 < min(caps[1:-1])  # first/last at 8 bits: ~256x less noise than 4 bits
    by_output = {n.outputs[0].name: n for n in graph.nodes if n.op == "DequantizeLinear"}
    dq = by_output[blocks[2].weights[0]]
    w = ctx.float_weights[dq.inputs[0].name[: -len("_quantized")]]
    scale = np.asarray(dq.inputs[1].values)[:, None, None, None]
    deq = np.asarray(dq.inputs[0].values).astype(np.float64) * scale
    assert caps[2] == pytest.approx(np.sum((deq - w) ** 2) / np.sum(w.astype(np.float64) ** 2), rel=1e-9)


def _config(**kw) -> onnxq.QuantConfig:
    base = dict(weight_bits=4, activation_bits=4, method="mrecg", mrecg_k=1, recon_iters=6, recon_samples=16,
                recon_batch_size=8, validate=True)
    base.update(kw)
    return without_floors(onnxq.QuantConfig(**base))


@pytest.mark.parametrize("base,capacity,iters",
                         [("brecq", "data", "per_unit"), ("qdrop", "proxy", "per_block")])
def test_mrecg_quantizes_tiny_cnn_end_to_end(tiny_calib, tmp_path, base, capacity, iters):
    cfg = _config(mrecg_base=base, mrecg_capacity=capacity, mrecg_iters=iters,
                  checkpoint_dir=str(tmp_path / "ck"))
    result = onnxq.quantize(MODELS / "tiny_cnn.onnx", tiny_calib, cfg)
    rep = result.report["mrecg"]
    assert rep["base"] == base and rep["capacity"] == capacity and len(rep["merges"]) == 1
    (merged,) = [grp for grp in rep["groups"] if len(grp) > 1]
    assert merged[1] == merged[0] + 1
    rec = result.report["reconstruction"]
    assert rec["method"] == base
    assert len(rec["blocks"]) == len(rep["blocks"]) - 2  # first layer skipped, 1 merge
    unit_iters = {b["kind"] == "merged": b["iters"] for b in rec["blocks"]}
    assert unit_iters == {True: 6 * len(merged) if iters == "per_block" else 6, False: 6}
    assert rep["final_pass"]["per"] == iters.split("_")[1]
    assert (rep["loss_before"][merged[-1]] is not None) == (capacity == "data")
    assert rep["loss_after"][merged[-1]] is not None and rep["loss_after"][merged[0]] is None
    if capacity == "data":
        assert rep["first_pass"]["iters"] == 2 and len(rep["first_pass"]["blocks"]) == len(rep["blocks"]) - 1
    assert result.validation.ok
    assert not (tmp_path / "ck").exists()
    out = result.save(tmp_path / "m.onnx")
    png = out.with_suffix(".mrecg.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    onnx.checker.check_model(str(out), full_check=True)


def test_mrecg_iterations_per_block_by_default_on_the_fast_schedule():
    """None follows the schedule: per block at 300 iterations (merged units otherwise under-trained),
    the paper's per unit on its 20k; an explicit choice wins; a bad one is a UserError."""
    assert mrecg_iters(_config()) == "per_block"
    assert mrecg_iters(_config(schedule="paper", recon_iters=None)) == "per_unit"
    assert mrecg_iters(_config(mrecg_iters="per_unit")) == "per_unit"
    with pytest.raises(UserError, match="mrecg.iters"):
        _config(mrecg_iters="per_layer")
