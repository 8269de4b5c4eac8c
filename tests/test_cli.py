"""The CLI: happy paths and every user mistake gets one line, a non-zero exit, and an untouched input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.cli import main
from tests.helpers import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,4] y) <float[6,3,3,3] w, float[6] b, float[6,4] wf> {
    c = Conv <pads=[1,1,1,1]> (x, w, b)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = MatMul (f, wf)
}"""


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    onnx.save(make_model(TEXT), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32))
    return tmp_path


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_writes_model_and_report(workdir, capsys):
    before = _digest(workdir / "m.onnx")
    code, out, _ = _run(capsys, "quantize", str(workdir / "m.onnx"), "-o", str(workdir / "q" / "m.int8.onnx"),
                        "--calib", str(workdir / "calib.npz"), "--batch-size", "2")
    assert code == 0
    assert "validation: OK" in out
    report = json.loads((workdir / "q" / "m.int8.report.json").read_text())
    assert report["validation"]["checker_ok"] and report["validation"]["runs_enable_all"]
    assert report["validation"]["integer_kernels"]
    assert _digest(workdir / "m.onnx") == before
    onnx.checker.check_model(str(workdir / "q" / "m.int8.onnx"), full_check=True)


def test_inspect_and_validate_commands(workdir, capsys):
    code, out, _ = _run(capsys, "inspect", str(workdir / "m.onnx"))
    assert code == 0 and "quantized: 2 weights" in out
    assert "reconstruction blocks" in out and "block00:layer(" in out
    code, out, _ = _run(capsys, "inspect", str(workdir / "m.onnx"), "--json")
    plan = json.loads(out)
    assert plan["ops"]["Conv"] == 1
    assert [b.split(":")[0] for b in plan["reconstruction"]["blocks"]] == ["block00", "block01"]
    code, out, _ = _run(capsys, "inspect", str(workdir / "m.onnx"), "--json", "--max-chain", "2")
    assert json.loads(out)["reconstruction"]["max_chain"] == 2
    q = workdir / "q.onnx"
    assert _run(capsys, "quantize", str(workdir / "m.onnx"), "-o", str(q), "--calib", str(workdir / "calib.npz"),
                "--no-validate")[0] == 0
    code, out, _ = _run(capsys, "validate", str(workdir / "m.onnx"), str(q), "--data", str(workdir / "calib.npz"))
    assert code == 0 and "SQNR" in out


def _expect_user_error(capsys, argv, fragment: str) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), err
    assert fragment in lines[0], lines[0]


def test_bad_inputs_get_one_line_errors(workdir, capsys):
    model, calib = str(workdir / "m.onnx"), str(workdir / "calib.npz")
    before = _digest(workdir / "m.onnx")
    not_onnx = workdir / "notes.onnx"
    not_onnx.write_text("hello, this is not a model")
    truncated = workdir / "trunc.onnx"
    truncated.write_bytes((workdir / "m.onnx").read_bytes()[:200])
    wrong = workdir / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 9, 9), np.float32))
    nan = workdir / "nan.npz"
    bad = np.zeros((4, 3, 8, 8), np.float32)
    bad[2, 0, 0, 0] = np.nan
    np.savez(nan, x=bad)
    out = str(workdir / "o.onnx")
    _expect_user_error(capsys, ["quantize", str(not_onnx), "-o", out, "--calib", calib], "not a readable ONNX")
    _expect_user_error(capsys, ["quantize", str(truncated), "-o", out, "--calib", calib], "trunc.onnx")
    _expect_user_error(capsys, ["quantize", str(workdir / "missing.onnx"), "-o", out, "--calib", calib], "not found")
    _expect_user_error(capsys, ["quantize", model, "-o", out, "--calib", str(wrong)], "shape")
    _expect_user_error(capsys, ["quantize", model, "-o", out, "--calib", str(nan)], "NaN")
    _expect_user_error(capsys, ["quantize", model, "-o", model, "--calib", calib], "would overwrite the input")
    _expect_user_error(capsys, ["quantize", model, "-o", out, "--calib", str(workdir / "none.npz")], "none.npz")
    assert _digest(workdir / "m.onnx") == before
    assert not Path(out).exists()


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(bad), "-o", str(tmp_path / "y.onnx"),
                           "--calib", str(tmp_path / "c.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_fisher_weighting_needs_classification_logits(tmp_path, capsys):
    onnx.save(make_model(TEXT.replace("(float[N,4] y)", "(float[N,6,8,8] y)").replace(
        "    p = GlobalAveragePool (r)\n    f = Flatten (p)\n    y = MatMul (f, wf)", "    y = Relu (r)")),
        tmp_path / "conv.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32))
    _expect_user_error(capsys, ["quantize", str(tmp_path / "conv.onnx"), "-o", str(tmp_path / "f.onnx"), "--calib",
                                str(tmp_path / "calib.npz"), "--method", "brecq", "--iters", "2", "--fisher"],
                       "logits")


def test_weight_phase_inputs_flag(tmp_path, capsys):
    onnx.save(make_model(TEXT), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "m.q.onnx"
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--weights", "int4", "--method", "brecq", "--iters", "2", "--weight-phase-inputs", "weights-only"])
    capsys.readouterr()
    assert code == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config"]["rounding"]["weight_inputs"] == "weights_only"


def _recon_report(workdir, capsys, name: str, *flags: str) -> dict:
    """Quantize the workdir model to int4 weights with ``flags``; the run's report."""
    out = workdir / f"m.{name}.onnx"
    code, _, _ = _run(capsys, "quantize", str(workdir / "m.onnx"), "-o", str(out), "--calib",
                      str(workdir / "calib.npz"), "--weights", "int4", *flags)
    assert code == 0
    return json.loads(out.with_suffix(".report.json").read_text())


def _expect_bad_flags(workdir, capsys, needle: str, *flags: str) -> None:
    bad = ["quantize", str(workdir / "m.onnx"), "-o", str(workdir / "bad.onnx"), "--calib",
           str(workdir / "calib.npz"), *flags]
    _expect_user_error(capsys, bad, needle)


def test_augment_flag(workdir, capsys):
    report = _recon_report(workdir, capsys, "aug", "--method", "qdrop", "--iters", "2", "--augment", "1")
    assert report["config"]["rounding"]["augment"] == 1
    samples = report["reconstruction"]["samples"]  # the originals (validation holds a few out), then flips
    assert samples % 2 == 0 and 12 < samples <= 24
    _expect_bad_flags(workdir, capsys, "augment", "--method", "rtn", "--augment", "1")


def test_long_schedule_flag(workdir, capsys):
    report = _recon_report(workdir, capsys, "long", "--method", "brecq", "--schedule", "long", "--iters", "2")
    assert report["config"]["rounding"]["schedule"] == "long" and report["config"]["rounding"]["augment"] == 3
    assert (report["reconstruction"]["iters"], report["reconstruction"]["augment"]) == (2, 3)
    plain = _recon_report(workdir, capsys, "long0", "--method", "brecq", "--schedule", "long", "--iters", "2",
                          "--augment", "0")
    assert plain["reconstruction"]["augment"] == 0
    assert plain["reconstruction"]["samples"] * 4 == report["reconstruction"]["samples"]


def test_round_weight_flag(workdir, capsys):
    report = _recon_report(workdir, capsys, "rw", "--method", "adaround", "--iters", "2",
                           "--round-weight", "0.5")
    assert report["config"]["rounding"]["round_weight"] == 0.5
    _expect_bad_flags(workdir, capsys, "round_weight", "--method", "brecq", "--round-weight", "-1")


def test_round_lr_flag(workdir, capsys):
    report = _recon_report(workdir, capsys, "rlr", "--method", "brecq", "--iters", "2", "--round-lr", "0.01")
    assert report["config"]["rounding"]["round_lr"] == 0.01
    assert report["reconstruction"]["round_lr"] == 0.01
    _expect_bad_flags(workdir, capsys, "round_lr", "--method", "brecq", "--round-lr", "0")


def test_act_iters_flag(workdir, capsys):
    report = _recon_report(workdir, capsys, "ai", "--method", "brecq", "--iters", "4", "--act-iters", "0")
    assert report["config"]["rounding"]["act_iters"] == 0 and report["reconstruction"]["act_iters"] == 0
    _expect_bad_flags(workdir, capsys, "act_iters", "--method", "brecq", "--act-iters", "-2")
    _expect_bad_flags(workdir, capsys, "no setting 'act_iters' (a setting of brecq)", "--method", "qdrop",
                      "--act-iters", "3")
