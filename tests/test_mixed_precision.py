"""Mixed precision: bit-plan config and overrides, the integer program on hand-checkable tables, plan files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxq.cli import main
from onnxq.config.files import load_bit_plan
from onnxq.config.legacy import QuantConfig
from onnxq.errors import UserError
from onnxq.mixed.plan import Budget, evaluate_plan, solve, uniform_plan
from onnxq.mixed.sensitivity import LayerInfo, SensitivityTable
from tests.helpers import one_torch_thread

torch_one_thread = pytest.fixture(one_torch_thread)

MODEL = "models/tiny_cnn.onnx"
CALIB = "models/tiny_cnn_calib.npz"


def _table(fixed: bool = False) -> SensitivityTable:
    """Three candidate layers (params 100, 300, 100) with mse costs at 4 and 2 bits; optionally a
    fixed 8-bit layer of 100 params. All-8-bit size 4000 bits (4800 with the fixed layer)."""
    layers = [LayerInfo("A", "Conv", 100, 1000, 8), LayerInfo("B", "Conv", 300, 300, 8),
              LayerInfo("C", "Gemm", 100, 100, 32)]
    costs = {"A": (1.0, 5.0), "B": (0.5, 3.0), "C": (2.0, 10.0)}
    base = 0.25
    values = {n: {8: {"mse": base}, 4: {"mse": base + c4}, 2: {"mse": base + c2}} for n, (c4, c2) in costs.items()}
    if fixed:
        layers.append(LayerInfo("F", "Gemm", 100, 100, 8, fixed_bits=8))
        values["F"] = {8: {"mse": 0.0}}
    return SensitivityTable(tuple(layers), (8, 4, 2), values, {"mse": base})


def test_size_budget_picks_the_hand_computed_optimum():
    table = _table()
    # 3000 bits: only B at 4 bits (saves 1200) fits with one change; cost 0.5
    plan = solve(table, Budget("size", 0.75))
    assert dict(plan.layers) == {"A": 8, "B": 4, "C": 8}
    assert plan.size_bits == 2800 and plan.degradation_increase == pytest.approx(0.5)
    assert plan.degradation == pytest.approx(0.75)
    # 2000 bits: all at 4 (cost 3.5, exactly 2000 bits) beats B at 2 + A at 4 (cost 4.0)
    plan = solve(table, Budget("size", 0.5))
    assert dict(plan.layers) == {"A": 4, "B": 4, "C": 4} and plan.size_bits == 2000
    assert plan.degradation_increase == pytest.approx(3.5)
    # absolute bits give the same answer
    assert solve(table, Budget("size", 2000, absolute=True)).layers == plan.layers
    # an ample budget keeps everything at 8 bits (ties go to the wider layer)
    assert set(dict(solve(table, Budget("size", 1.0)).layers).values()) == {8}


def test_fixed_layers_count_in_the_budget_but_are_not_chosen():
    table = _table(fixed=True)  # all-8 = 4800 bits; the fixed layer always costs 800
    plan = solve(table, Budget("size", 2800 / 4800))  # 2000 bits left for A, B, C
    assert dict(plan.layers) == {"A": 4, "B": 4, "C": 4, "F": 8}
    assert plan.size_bits == 2800 and plan.size_ratio == pytest.approx(2800 / 4800)


def test_uniform_plan_size_matches_the_milp_budget():
    table = _table(fixed=True)
    u4 = uniform_plan(table, 4)
    assert u4.size_bits == 4 * 500 + 8 * 100
    plan = solve(table, Budget("size", u4.size_ratio))
    assert plan.size_bits <= u4.size_bits and plan.degradation <= u4.degradation + 1e-12


def test_bops_budget_uses_activation_bits_and_macs():
    table = _table()
    # BOPs at 8 bits: A 8*8*1000 = 64000, B 8*8*300 = 19200, C 8*32*100 = 25600; total 108800
    bops8 = 64000 + 19200 + 25600
    # halve A (saves 32000): cheapest way (cost 1.0) under 80000 BOPs; B at 2 only saves 14400
    plan = solve(table, Budget("bops", 80000 / bops8))
    assert dict(plan.layers) == {"A": 4, "B": 8, "C": 8}
    assert plan.bops == 32000 + 19200 + 25600


def test_dual_smallest_model_under_a_degradation_bound():
    table = _table()
    plan = solve(table, Budget("degradation", 0.6))  # only B at 4 (0.5) fits under 0.6
    assert dict(plan.layers) == {"A": 8, "B": 4, "C": 8} and plan.size_bits == 2800
    plan = solve(table, Budget("degradation", 4.0))  # all at 4 (cost 3.5, 2000 bits) vs B2 + A4 (4.0, 1800)
    assert plan.degradation_increase <= 4.0 + 1e-9
    assert plan.size_bits == 100 * 4 + 300 * 2 + 100 * 8  # 1800: B2 + A4 = 4.0 saves the most
    assert set(dict(solve(table, Budget("degradation", 0.0)).layers).values()) == {8}


def test_infeasible_budget_is_a_user_error():
    with pytest.raises(UserError, match="below the smallest plan"):
        solve(_table(), Budget("size", 0.2))  # all at 2 bits is 0.25
    with pytest.raises(UserError, match="positive"):
        Budget("size", 0.0)
    with pytest.raises(UserError, match="no 'fisher' measure"):
        solve(_table(), Budget("size", 0.5), measure="fisher")


def test_plan_json_is_the_bit_plan_format(tmp_path):
    table = _table(fixed=True)
    plan = solve(table, Budget("size", 0.6))
    path = plan.save(tmp_path / "m.bitplan.json")
    data = json.loads(path.read_text())
    assert data["layers"] == dict(plan.layers) and data["budget"] == {"kind": "size", "value": 0.6, "absolute": False}
    assert data["predicted"]["size_bits"] == plan.size_bits and data["widths"] == [8, 4, 2]
    assert load_bit_plan(path) == plan.layers
    assert QuantConfig(bit_plan=load_bit_plan(path)).bit_plan == plan.layers
    assert evaluate_plan(table, dict(plan.layers)).size_bits == plan.size_bits
    table2 = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert table2.values == table.values and table2.layers == table.layers


def test_bit_plan_config_validation():
    assert QuantConfig(bit_plan={"a": 4, "b": 2}).bit_plan == (("a", 4), ("b", 2))
    assert QuantConfig(bit_plan={"a": 4}).output_opset == 21
    with pytest.raises(UserError, match="use one of 8, 4, 2"):
        QuantConfig(bit_plan={"a": 3})
    with pytest.raises(UserError, match="twice"):
        QuantConfig(bit_plan=[("a", 4), ("a", 8)])
    with pytest.raises(UserError, match="not \\(node name, bits\\)"):
        QuantConfig(bit_plan=["a"])


def test_bit_plan_overrides_layer_widths_in_the_quantized_model():
    import onnx

    from onnxq.api import quantize

    calib = [{"input": np.load(CALIB)["input"][i:i + 16]} for i in range(0, 64, 16)]
    plan = {"/features/features.0/Conv": 4, "/features/features.3/body/body.3/Conv": 2, "/fc/Gemm": 4}
    result = quantize(MODEL, calib, QuantConfig(bit_plan=plan, validate=False))
    m = result.model
    inits = {i.name: i for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}

    def codes(layer: str) -> onnx.TensorProto:
        node = next(n for n in m.graph.node if n.name == layer)
        src = producers[node.input[1]].input[0]
        while src not in inits:  # int2 codes are read through a Cast to int8 (onnxq.core.weight_cast)
            src = producers[src].input[0]
        return inits[src]

    assert codes("/features/features.0/Conv").data_type == onnx.TensorProto.INT4  # the plan beats first_last
    assert codes("/fc/Gemm").data_type == onnx.TensorProto.INT4
    assert codes("/features/features.5/Conv").data_type == onnx.TensorProto.INT8  # not in the plan: 8 bits
    assert codes("/features/features.3/body/body.3/Conv").data_type == onnx.TensorProto.INT2  # ternary in int2
    ternary = onnx.numpy_helper.to_array(codes("/features/features.3/body/body.3/Conv"))
    assert set(np.unique(ternary.astype(np.int64)).tolist()) <= {-1, 0, 1}  # 2 bits: ternary codes
    with pytest.raises(UserError, match="not quantized weighted layers"):
        quantize(MODEL, calib, QuantConfig(bit_plan={"nope": 4}, validate=False))


def test_cli_bit_plan_and_mixed_precision(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", MODEL, "-o", str(out), "--calib", CALIB, "--batch-size", "16", "--no-validate",
               "--mixed-precision", "--size-budget", "0.6", "--mp-widths", "8,4"])
    assert rc == 0
    plan_file = tmp_path / "q.bitplan.json"
    data = json.loads(plan_file.read_text())
    assert set(data["layers"].values()) <= {8, 4} and data["predicted"]["size_ratio"] <= 0.6
    report = json.loads((tmp_path / "q.report.json").read_text())
    rows = report["mixed_precision"]["layers"]
    assert [r["bits"] for r in rows] == list(data["layers"].values())
    assert all(set(r["sensitivity"]) == ({"8"} if r["fixed"] else {"8", "4"}) for r in rows)
    rc = main(["quantize", MODEL, "-o", str(tmp_path / "q2.onnx"), "--calib", CALIB, "--batch-size", "16",
               "--no-validate", "--bit-plan", str(plan_file)])
    assert rc == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"/fc/Gemm": 3}}))
    capsys.readouterr()
    assert main(["quantize", MODEL, "-o", str(tmp_path / "q3.onnx"), "--calib", CALIB, "--bit-plan", str(bad)]) == 2
    assert "use one of 8, 4, 2" in capsys.readouterr().err
    assert main(["quantize", MODEL, "-o", str(tmp_path / "q4.onnx"), "--calib", CALIB, "--size-budget", "0.5"]) == 2
    assert "add --mixed-precision" in capsys.readouterr().err
    assert main(["quantize", MODEL, "-o", str(tmp_path / "q5.onnx"), "--calib", CALIB, "--mixed-precision",
                 "--size-budget", "0.01", "--mp-widths", "8,4", "--no-validate"]) == 2
    assert "below the smallest plan" in capsys.readouterr().err


def test_cli_mixed_precision_with_an_adaquant_table(tmp_path, torch_one_thread):
    """--mp-reconstruct adaquant: the table's 4-bit weights come from parallel AdaQuant (--iters long),
    and the report says so."""
    out = tmp_path / "q.onnx"
    rc = main(["quantize", MODEL, "-o", str(out), "--calib", CALIB, "--batch-size", "16", "--no-validate",
               "--mixed-precision", "--size-budget", "0.6", "--mp-widths", "8,4",
               "--mp-reconstruct", "adaquant", "--iters", "10", "--recon-samples", "48"])
    assert rc == 0
    section = json.loads((tmp_path / "q.report.json").read_text())["mixed_precision"]
    assert section["table_weights"] == "adaquant" and section["plan"]["predicted"]["size_ratio"] <= 0.6
