"""No behaviour change, proven: the bundled models quantized with representative settings must give
byte-identical files to the ones recorded in ``tests/golden/byte_identity.json``.

Each case runs the public CLI (``onnxq quantize ...``), so the flag -> configuration mapping is
covered too, and hashes the written model. The recorded hashes are per *numeric environment*
(:func:`environment_key`: the CPU's vector-instruction families and the versions of onnxruntime,
torch and numpy), because float kernels sum in a different order on AVX2 and AVX-512, which moves
calibrated ranges by an ulp. On an environment that has no record the test compares with the
nearest recorded environment's *model files* instead (``tests/golden/models``): same graph, same
integer codes except isolated one-step flips, and scales within 1e-4 relative.

Re-record (only when a change of behaviour is intended, and say so in the commit):
``python -m tests.test_byte_identity --record``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = GOLDEN / "byte_identity.json"
CALIB = str(MODELS / "tiny_cnn_calib.npz")
FEW = ("--iters", "4", "--recon-samples", "16", "--recon-batch-size", "8", "--no-validate")

#: case -> (model file, extra CLI arguments); every case is one representative setting.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "w8a8_default": ("tiny_cnn.onnx", ()),
    "w8a8_percentile_per_tensor": ("tiny_cnn.onnx", ("--calib-method", "percentile", "--per-tensor",
                                                     "--no-validate")),
    "pow2_int8": ("tiny_cnn.onnx", ("--scale", "pow2", "--activations", "int8", "--no-validate")),
    "tensorrt": ("tiny_cnn.onnx", ("--target", "tensorrt", "--no-validate")),
    "openvino": ("tiny_cnn.onnx", ("--target", "openvino", "--calib-method", "entropy", "--no-validate")),
    "qnn_a16": ("tiny_cnn.onnx", ("--target", "qnn-a16", "--no-validate")),
    "npu_pow2": ("tiny_cnn.onnx", ("--target", "npu-pow2", "--no-validate")),
    "w4_rtn_dfq": ("tiny_cnn.onnx", ("--weights", "int4", "--weight-method", "mse", "--equalize",
                                     "--bias-correction", "data", "--no-validate")),
    "w4_brecq": ("tiny_cnn.onnx", ("--weights", "int4", "--method", "brecq", "--weight-asymmetric", *FEW)),
    "w4a4_qdrop": ("tiny_cnn.onnx", ("--weights", "int4", "--activation-bits", "4", "--method", "qdrop",
                                     "--calib-method", "mse", *FEW)),
    "w4_adaround_stats": ("tiny_cnn.onnx", ("--weights", "int4", "--method", "adaround", "--stats-tuning", *FEW)),
    "w4_adaquant": ("tiny_cnn.onnx", ("--weights", "int4", "--method", "adaquant", *FEW)),
    "w4a4_mrecg": ("tiny_cnn.onnx", ("--weights", "int4", "--activation-bits", "4", "--method", "mrecg",
                                     "--mrecg-k", "1", *FEW)),
    "ternary_twn_brecq": ("tiny_cnn.onnx", ("--weights", "ternary", "--ternary-method", "twn", "--method",
                                            "brecq", *FEW)),
    "int2_uniform": ("tiny_cnn.onnx", ("--weights", "int2", "--weight-method", "mse", "--bias-tuning",
                                       "--no-validate")),
    "mixed_precision": ("tiny_cnn.onnx", ("--mixed-precision", "--size-budget", "0.6", "--no-validate")),
    "mlp_w8a8": ("tiny_mlp.onnx", ("--no-validate",)),
    "unet_w4_brecq": ("tiny_unet.onnx", ("--weights", "int4", "--method", "brecq", *FEW)),
}

_ISA_FLAGS = ("AVX2", "FMA3", "AVX512F", "AVX512VNNI", "AVX512BF16", "ASIMD", "ASIMDDP")


def environment_key() -> str:
    """What the float numerics depend on: vector-instruction families (as CPUID reports them, read
    through numpy's runtime dispatch) and the numeric libraries' versions."""
    import onnxruntime
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    isa = "+".join(f for f in _ISA_FLAGS if features.get(f)) or "baseline"
    return (f"{platform.machine()}:{isa}|ort {onnxruntime.__version__}|torch {torch.__version__}"
            f"|numpy {np.__version__}")


def _unet_calib(tmp: Path) -> str:
    path = tmp / "unet_calib.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, image=rng.uniform(0, 1, (24, 3, 32, 32)).astype(np.float32))
    return str(path)


def _mlp_calib(tmp: Path) -> str:
    path = tmp / "mlp_calib.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.standard_normal((48, 16)).astype(np.float32))
    return str(path)


def run_case(name: str, out_dir: Path) -> Path:
    """Quantize case ``name`` with the CLI into ``out_dir``; returns the written model."""
    model, extra = CASES[name]
    calib = {"tiny_cnn.onnx": CALIB, "tiny_mlp.onnx": _mlp_calib(out_dir),
             "tiny_unet.onnx": _unet_calib(out_dir)}[model]
    out = out_dir / f"{name}.onnx"
    code = main(["quantize", str(MODELS / model), "-o", str(out), "--calib", calib, "--batch-size", "8", *extra])
    assert code == 0, f"case {name} exited {code}"
    return out


#: Files written beside the model that must not change either (the report holds timings).
_SIDE_FILES = (".encodings", ".bitplan.json")


def _digest(path: Path) -> str:
    """sha256 of the model and of the side files written next to it."""
    h = hashlib.sha256(path.read_bytes())
    for suffix in _SIDE_FILES:
        side = path.with_suffix(suffix)
        if side.exists():
            h.update(suffix.encode() + side.read_bytes())
    return h.hexdigest()


def _records() -> dict[str, dict[str, str]]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_equivalent(got: onnx.ModelProto, want: onnx.ModelProto) -> None:
    """Same graph; integer tensors equal but for rare one-step flips; float tensors within 1e-4 relative."""
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in want.graph.node]
    a, b = _initializers(got), _initializers(want)
    assert a.keys() == b.keys()
    for name, x in a.items():
        y = b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7, err_msg=name)
        else:
            diff = np.abs(x.astype(np.int64) - y.astype(np.int64))
            assert diff.max(initial=0) <= 1 and diff.mean() <= 0.01, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_bundled_models_are_byte_identical(name: str, tmp_path: Path) -> None:
    out = run_case(name, tmp_path)
    records = _records()
    key = environment_key()
    if key in records:
        assert _digest(out) == records[key][name], f"{name}: output changed on {key}"
    else:
        want = onnx.load(str(GOLDEN / "models" / f"{name}.onnx"))
        assert_equivalent(onnx.load(str(out)), want)


def _record(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    records = _records()
    key = environment_key()
    records[key] = {name: _digest(run_case(name, out_dir)) for name in sorted(CASES)}
    RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    models = GOLDEN / "models"
    models.mkdir(exist_ok=True)
    if not any(models.iterdir()):  # the first recorded environment's files are the reference
        for name in CASES:
            (models / f"{name}.onnx").write_bytes((out_dir / f"{name}.onnx").read_bytes())
    sys.stdout.write(f"recorded {len(CASES)} cases for {key}\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_byte_identity --record")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _record(Path(tmp))
