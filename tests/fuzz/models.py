"""Broken and unusual models, built inline with onnx.helper, each fed to ``onnxq quantize``.

The base model: Conv 3->4 (3x3, pad 1) on 1x3x8x8 -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from tests.fuzz.harness import FAST, Case

SHAPE = (1, 3, 8, 8)
N_CALIB = 16


def _weights(seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(dtype),
        "B": (rng.standard_normal(4) * 0.1).astype(dtype),
        "G": (rng.standard_normal((5, 4)) * 0.5).astype(dtype),
        "GB": (rng.standard_normal(5) * 0.1).astype(dtype),
    }


def base_model(*, batch: int | str = 1, elem: int = TensorProto.FLOAT, dtype: type = np.float32, opset: int = 17,
               ir_version: int = 8, weights: dict[str, np.ndarray] | None = None, input_name: str = "x",
               names: tuple[str, ...] = ("conv", "relu", "gap", "flat", "fc"), hw: tuple[int, int] = (8, 8),
               check: bool = True) -> onnx.ModelProto:
    w = weights if weights is not None else _weights(dtype=dtype)
    inits = [nh.from_array(v, k) for k, v in w.items()]
    nodes = [
        h.make_node("Conv", [input_name, "W", "B"], ["c"], name=names[0], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name=names[1]),
        h.make_node("GlobalAveragePool", ["r"], ["p"], name=names[2]),
        h.make_node("Flatten", ["p"], ["f"], name=names[3]),
        h.make_node("Gemm", ["f", "G", "GB"], ["y"], name=names[4], transB=1),
    ]
    graph = h.make_graph(nodes, "fuzz", [h.make_tensor_value_info(input_name, elem, [batch, 3, *hw])],
                         [h.make_tensor_value_info("y", elem, [batch, 5])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="fuzz")
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model)
    return model


def images(n: int = N_CALIB, seed: int = 0, shape: tuple[int, ...] = SHAPE[1:]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_base(d: Path, name: str = "m.onnx", batch: int | str = 1, **kw: object) -> None:
    """The base model at ``d/name`` and ``d/d.npz`` (16 standard-normal images under 'x'), and ``notes.txt``."""
    save(base_model(batch=batch, **kw), d / name)  # type: ignore[arg-type]
    save_npz(d / "d.npz", x=images())
    (d / "notes.txt").write_text("unrelated notes: must survive every run\n")


def quantize_words(model: str = "m.onnx", data: str = "d.npz", out: str = "out.onnx",
                   extra: list[str] | None = None) -> list[str]:
    return ["quantize", model, "-o", out, "--calib", data, *FAST, *(extra or [])]


# ------------------------------------------------------------------------------------------ builders
Builder = Callable[[Path], list[str]]


def _with_model(model_fn: Callable[[], onnx.ModelProto], data_fn: Callable[[], dict[str, np.ndarray]] | None = None,
                extra: list[str] | None = None, name: str = "m.onnx") -> Builder:
    def build(d: Path) -> list[str]:
        save(model_fn(), d / name)
        save_npz(d / "d.npz", **(data_fn() if data_fn else {"x": images()}))
        (d / "notes.txt").write_text("notes\n")
        return quantize_words(name, extra=extra)
    return build


def _with_bytes(data: Callable[[], bytes], name: str = "m.onnx", extra: list[str] | None = None) -> Builder:
    def build(d: Path) -> list[str]:
        (d / name).write_bytes(data())
        save_npz(d / "d.npz", x=images())
        (d / "notes.txt").write_text("notes\n")
        return quantize_words(name, extra=extra)
    return build


def base_bytes(**kw: object) -> bytes:
    return base_model(**kw).SerializeToString()  # type: ignore[arg-type]


def _random_bytes(seed: int, n: int) -> Callable[[], bytes]:
    return lambda: np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _truncated(fraction: float) -> Callable[[], bytes]:
    def data() -> bytes:
        b = base_bytes()
        return b[: int(len(b) * fraction)]
    return data


def _folder_model(d: Path) -> list[str]:
    (d / "m.onnx").mkdir()
    save(base_model(), d / "m.onnx" / "model.onnx")
    save_npz(d / "d.npz", x=images())
    return quantize_words()


def _nonfinite(value: float, key: str = "W", count: int = 1) -> Callable[[], onnx.ModelProto]:
    def fn() -> onnx.ModelProto:
        w = _weights()
        flat = w[key].reshape(-1)
        flat[:count] = value
        return base_model(weights=w)
    return fn


def _mismatched_dtype() -> onnx.ModelProto:
    w = _weights()
    w["W"] = w["W"].astype(np.float64)  # float input, double weight: the checker does not infer types
    return base_model(weights=w, check=False)


def _mismatched_channels(cin: int) -> Callable[[], onnx.ModelProto]:
    def fn() -> onnx.ModelProto:
        w = _weights()
        w["W"] = np.random.default_rng(1).standard_normal((4, cin, 3, 3)).astype(np.float32)
        return base_model(weights=w, check=False)
    return fn


def _gemm_mismatch() -> onnx.ModelProto:
    w = _weights()
    w["G"] = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    return base_model(weights=w, check=False)


def _duplicate_names() -> onnx.ModelProto:
    return base_model(names=("n", "n", "n", "n", "n"), check=False)


def _empty_names() -> onnx.ModelProto:
    return base_model(names=("", "", "", "", ""))


def _opset(opset: int, ir: int = 8) -> Callable[[], onnx.ModelProto]:
    return lambda: base_model(opset=opset, ir_version=ir, check=False)


def _zero_dim_input() -> onnx.ModelProto:
    return base_model(hw=(0, 8), check=False)


def _zero_out_channels() -> onnx.ModelProto:
    w = _weights()
    w["W"] = np.zeros((0, 3, 3, 3), np.float32)
    w["B"] = np.zeros(0, np.float32)
    w["G"] = np.zeros((5, 0), np.float32)
    return base_model(weights=w, check=False)


def _input_is_output() -> onnx.ModelProto:
    m = base_model()
    m.graph.output.append(h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]))
    return m


def _intermediate_is_output() -> onnx.ModelProto:
    m = base_model()
    m.graph.output.append(h.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8]))
    return m


def _sparse_initializer() -> onnx.ModelProto:
    m = base_model()
    g = [i for i in m.graph.initializer if i.name == "G"][0]
    dense = nh.to_array(g)
    m.graph.initializer.remove(g)
    idx = np.flatnonzero(np.abs(dense) > 0.3).astype(np.int64)
    values = nh.from_array(dense.reshape(-1)[idx], "G")
    sparse = h.make_sparse_tensor(values, nh.from_array(idx, "G_idx"), list(dense.shape))
    m.graph.sparse_initializer.append(sparse)
    return m


def _typed(elem: int, dtype: type) -> Callable[[], onnx.ModelProto]:
    return lambda: base_model(elem=elem, dtype=dtype)


def _bf16() -> onnx.ModelProto:
    w = _weights()
    inits = [h.make_tensor(k, TensorProto.BFLOAT16, list(v.shape), v.reshape(-1).tolist()) for k, v in w.items()]
    m = base_model(elem=TensorProto.BFLOAT16, check=False)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def _einsum(eq: str = "bi,ij->bj") -> onnx.ModelProto:
    w = nh.from_array((np.random.default_rng(0).standard_normal((4, 5)) * 0.5).astype(np.float32), "E")
    node = h.make_node("Einsum", ["x", "E"], ["y"], name="einsum", equation=eq)
    g = h.make_graph([node], "einsum", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _gemm_only(trans_a: int, trans_b: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    b = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    shape = [4, 1] if trans_a else [1, 4]
    node = h.make_node("Gemm", ["x", "Wg", "bg"], ["y"], name="gemm", transA=trans_a, transB=trans_b)
    g = h.make_graph([node], "gemm", [h.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                     [nh.from_array(b, "Wg"), nh.from_array(np.zeros(5, np.float32), "bg")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _matmul_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "A"], ["a"], name="mm1"), h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "Bm"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "mm", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                     [nh.from_array(rng.standard_normal((4, 6)).astype(np.float32), "A"),
                      nh.from_array(rng.standard_normal((6, 5)).astype(np.float32), "Bm")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _no_nodes() -> onnx.ModelProto:
    g = h.make_graph([], "empty", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _identity_only() -> onnx.ModelProto:
    g = h.make_graph([h.make_node("Identity", ["x"], ["y"], name="id")], "id",
                     [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _scalar_input() -> onnx.ModelProto:
    w = nh.from_array(np.linspace(-1, 1, 5).astype(np.float32), "S")
    nodes = [h.make_node("Mul", ["x", "S"], ["m"], name="mul"), h.make_node("Relu", ["m"], ["y"], name="relu")]
    g = h.make_graph(nodes, "scalar", [h.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [5])], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _lstm() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden, inp = 5, 3
    W = (rng.standard_normal((1, 4 * hidden, inp)) * 0.3).astype(np.float32)
    R = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    B = np.zeros((1, 8 * hidden), np.float32)
    G = (rng.standard_normal((hidden, 2)) * 0.5).astype(np.float32)
    nodes = [
        h.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=hidden),
        h.make_node("Squeeze", ["Y_h", "ax"], ["hs"], name="sq"),
        h.make_node("MatMul", ["hs", "G"], ["y"], name="fc"),
    ]
    g = h.make_graph(nodes, "lstm", [h.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, inp])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                     [nh.from_array(W, "W"), nh.from_array(R, "R"), nh.from_array(B, "B"), nh.from_array(G, "G"),
                      nh.from_array(np.array([0], np.int64), "ax")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _two_inputs() -> onnx.ModelProto:
    m = base_model()
    m.graph.input.append(h.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5]))
    m.graph.node.append(h.make_node("Add", ["y", "z"], ["y2"], name="add"))
    del m.graph.output[:]
    m.graph.output.append(h.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 5]))
    return m


def _int_input() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((10, 4)) * 0.5).astype(np.float32)
    fc = (rng.standard_normal((4, 5)) * 0.5).astype(np.float32)
    nodes = [h.make_node("Gather", ["E", "x"], ["e"], name="gather"),
             h.make_node("MatMul", ["e", "F"], ["y"], name="fc")]
    g = h.make_graph(nodes, "emb", [h.make_tensor_value_info("x", TensorProto.INT64, [1, 6])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])],
                     [nh.from_array(emb, "E"), nh.from_array(fc, "F")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _custom_domain() -> onnx.ModelProto:
    m = base_model()
    m.graph.node[1].op_type = "FancyRelu"
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(h.make_opsetid("com.example", 1))
    return m


def _unknown_op() -> onnx.ModelProto:
    m = base_model(check=False)
    m.graph.node[1].op_type = "NotAnOp"
    return m


def _undefined_input() -> onnx.ModelProto:
    m = base_model(check=False)
    m.graph.node[1].input[0] = "ghost"
    return m


def _cycle() -> onnx.ModelProto:
    m = base_model(check=False)
    m.graph.node[0].input[0] = "r"  # Conv reads Relu's output, Relu reads Conv's
    return m


def _initializer_as_input() -> onnx.ModelProto:
    m = base_model(ir_version=3, opset=9, check=False)
    for name, shape in (("W", [4, 3, 3, 3]), ("B", [4]), ("G", [5, 4]), ("GB", [5])):
        m.graph.input.append(h.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    return m


def _overridable_initializers() -> onnx.ModelProto:
    m = base_model()
    for name, shape in (("W", [4, 3, 3, 3]), ("B", [4])):
        m.graph.input.append(h.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    return m


def _dynamic_everything() -> onnx.ModelProto:
    m = base_model(batch="N")
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = "H"
    dims[3].dim_param = "W_"
    return m


def _no_shape() -> onnx.ModelProto:
    m = base_model()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    return m


def _huge_declared() -> onnx.ModelProto:
    m = base_model(batch="N")
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 999999
    return m


def _ir(ir: int) -> Callable[[], onnx.ModelProto]:
    return lambda: base_model(ir_version=ir, check=False)


def _if_subgraph() -> onnx.ModelProto:
    m = base_model()
    then_g = h.make_graph([h.make_node("Identity", ["y"], ["t"])], "then", [],
                          [h.make_tensor_value_info("t", TensorProto.FLOAT, [1, 5])])
    else_g = h.make_graph([h.make_node("Neg", ["y"], ["e"])], "else", [],
                          [h.make_tensor_value_info("e", TensorProto.FLOAT, [1, 5])])
    m.graph.initializer.append(nh.from_array(np.array(True), "cond"))
    m.graph.node.append(h.make_node("If", ["cond"], ["y2"], name="if", then_branch=then_g, else_branch=else_g))
    del m.graph.output[:]
    m.graph.output.append(h.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 5]))
    return m


def _batchnorm() -> onnx.ModelProto:
    m = base_model()
    m.graph.node[1].input[0] = "bn"
    m.graph.node.insert(1, h.make_node("BatchNormalization", ["c", "s", "b0", "mu", "var"], ["bn"], name="bn"))
    m.graph.initializer.extend([nh.from_array(np.ones(4, np.float32), "s"),
                                nh.from_array(np.zeros(4, np.float32), "b0"),
                                nh.from_array(np.zeros(4, np.float32), "mu"),
                                nh.from_array(np.zeros(4, np.float32), "var")])  # variance 0: eps only
    return m


def _giant_weights() -> onnx.ModelProto:
    w = _weights()
    w["W"] *= 1e30
    return base_model(weights=w)


def _denormal_weights() -> onnx.ModelProto:
    w = _weights()
    w["W"] *= 1e-42
    return base_model(weights=w)


def _zero_weights() -> onnx.ModelProto:
    w = {k: np.zeros_like(v) for k, v in _weights().items()}
    return base_model(weights=w)


def _constant_weights() -> onnx.ModelProto:
    w = {k: np.full_like(v, 0.25) for k, v in _weights().items()}
    return base_model(weights=w)


# ------------------------------------------------------------------------------------------ external data
def _external(mode: str) -> Builder:
    """Base model with W in an external file; ``mode`` breaks the reference."""
    def build(d: Path) -> list[str]:
        folder = d / "models" if mode == "escape" else d
        folder.mkdir(parents=True, exist_ok=True)
        m = base_model()
        location = {"valid": "w.bin", "longer": "w.bin", "shorter": "w.bin", "self": "m.onnx", "escape": "../x.bin",
                    "absolute": str(d / "w.bin"), "missing": "nope.bin", "offset": "w.bin",
                    "folder": "wdir"}[mode]
        W = [i for i in m.graph.initializer if i.name == "W"][0]
        raw = nh.to_array(W).tobytes()
        W.ClearField("float_data")
        W.ClearField("raw_data")
        W.data_location = TensorProto.EXTERNAL
        entries = {"location": location}
        if mode == "offset":
            entries.update(offset="100000", length=str(len(raw)))
        for k, v in entries.items():
            e = W.external_data.add()
            e.key, e.value = k, v
        target = folder / "m.onnx"
        target.write_bytes(m.SerializeToString())
        if mode in ("valid", "longer", "shorter", "offset", "absolute"):
            blob = raw + (b"\x00" * 4096 if mode == "longer" else b"")
            blob = blob[:50] if mode == "shorter" else blob
            (d / "w.bin").write_bytes(blob)
        elif mode == "escape":
            (d / "x.bin").write_bytes(raw)
        elif mode == "folder":
            (d / "wdir").mkdir()
        save_npz(d / "d.npz", x=images())
        (d / "notes.txt").write_text("notes\n")
        rel = os.path.relpath(target, d)
        return quantize_words(rel)
    return build


def _external_real(d: Path) -> list[str]:
    """External data written by onnx itself (all tensors in one file)."""
    onnx.save_model(base_model(), str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    save_npz(d / "d.npz", x=images())
    return quantize_words()


# ------------------------------------------------------------------------------------------ data of models
def _data(**shapes: tuple[tuple[int, ...], type]) -> Callable[[], dict[str, np.ndarray]]:
    def fn() -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        out = {}
        for k, (shape, dt) in shapes.items():
            if np.dtype(dt).kind in "iu":
                out[k] = rng.integers(0, 10, shape).astype(dt)
            else:
                out[k] = rng.standard_normal(shape).astype(np.float32).astype(dt)
        return out
    return fn


def _bf16_data() -> dict[str, np.ndarray]:
    import ml_dtypes

    return {"x": images().astype(ml_dtypes.bfloat16)}


CASES: list[Case] = [
    Case("model-baseline", _with_model(base_model), fast=True),
    Case("model-baseline-gptq", lambda d: (write_base(d), ["quantize", "m.onnx", "-o", "out.onnx", "--calib",
                                                          "d.npz"])[1]),
    Case("model-baseline-dynamic-batch", _with_model(lambda: base_model(batch="N"))),
    Case("model-empty-file", _with_bytes(lambda: b""), fast=True),
    Case("model-one-byte", _with_bytes(lambda: b"\x08")),
    Case("model-folder", _folder_model),
    Case("model-missing", lambda d: (write_base(d), quantize_words("absent.onnx"))[1]),
    Case("model-wrong-ext-txt", _with_model(base_model, name="m.txt")),
    Case("model-no-ext", _with_model(base_model, name="model")),
    Case("model-text-file", _with_bytes(lambda: b"this is not a model\n")),
    Case("model-json", _with_bytes(lambda: b'{"graph": {}}')),
    Case("model-npz-as-model", lambda d: (write_base(d), quantize_words("d.npz"))[1]),
    *[Case(f"model-truncated-{int(f * 100)}", _with_bytes(_truncated(f)))
      for f in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)],
    Case("model-truncated-minus1", _with_bytes(lambda: base_bytes()[:-1])),
    Case("model-appended-junk", _with_bytes(lambda: base_bytes() + b"\xff\xfe junk")),
    Case("model-appended-zeros", _with_bytes(lambda: base_bytes() + b"\x00" * 64)),
    *[Case(f"model-random-bytes-{seed}-{n}", _with_bytes(_random_bytes(seed, n)))
      for seed, n in ((0, 1000), (1, 16), (2, 100000), (3, 4), (4, 2000))],
    Case("model-mismatched-dtype", _with_model(_mismatched_dtype), fast=True),
    *[Case(f"model-conv-cin-{c}", _with_model(_mismatched_channels(c))) for c in (1, 2, 6)],
    Case("model-gemm-mismatch", _with_model(_gemm_mismatch)),
    Case("model-duplicate-node-names", _with_model(_duplicate_names)),
    Case("model-empty-node-names", _with_model(_empty_names)),
    *[Case(f"model-opset-{o}", _with_model(_opset(o, 10 if o > 21 else 8)))
      for o in (7, 9, 10, 11, 12, 13, 21, 22, 23, 24, 25, 26, 30, 1000)],
    Case("model-nan-weight", _with_model(_nonfinite(float("nan"))), fast=True),
    Case("model-inf-weight", _with_model(_nonfinite(float("inf")))),
    Case("model-neginf-weight", _with_model(_nonfinite(float("-inf")))),
    Case("model-nan-bias", _with_model(_nonfinite(float("nan"), "B"))),
    Case("model-nan-gemm", _with_model(_nonfinite(float("nan"), "G", 20))),
    Case("model-inf-gemm-bias", _with_model(_nonfinite(float("inf"), "GB"))),
    Case("model-all-nan-conv", _with_model(_nonfinite(float("nan"), "W", 108))),
    Case("model-giant-weights", _with_model(_giant_weights)),
    Case("model-denormal-weights", _with_model(_denormal_weights)),
    Case("model-zero-weights", _with_model(_zero_weights)),
    Case("model-constant-weights", _with_model(_constant_weights)),
    Case("model-zero-dim-input", _with_model(_zero_dim_input, _data(x=((16, 3, 0, 8), np.float32)))),
    Case("model-zero-dim-input-normal-data", _with_model(_zero_dim_input)),
    Case("model-zero-out-channels", _with_model(_zero_out_channels)),
    Case("model-input-is-output", _with_model(_input_is_output), fast=True),
    Case("model-intermediate-is-output", _with_model(_intermediate_is_output)),
    Case("model-sparse-initializer", _with_model(_sparse_initializer)),
    Case("model-fp16", _with_model(_typed(TensorProto.FLOAT16, np.float16),
                                   _data(x=((16, 3, 8, 8), np.float16))), fast=True),
    Case("model-fp16-fp32-data", _with_model(_typed(TensorProto.FLOAT16, np.float16))),
    Case("model-fp64", _with_model(_typed(TensorProto.DOUBLE, np.float64), _data(x=((16, 3, 8, 8), np.float64)))),
    Case("model-fp64-fp32-data", _with_model(_typed(TensorProto.DOUBLE, np.float64))),
    Case("model-bf16", _with_model(_bf16, _bf16_data)),
    Case("model-bf16-fp32-data", _with_model(_bf16)),
    Case("model-einsum", _with_model(_einsum, _data(x=((16, 4), np.float32)))),
    Case("model-einsum-int4", _with_model(_einsum, _data(x=((16, 4), np.float32)), extra=["--weights", "int4"])),
    Case("model-einsum-batched", _with_model(lambda: _einsum("bi,ij->bj"), _data(x=((16, 1, 4), np.float32)))),
    Case("model-gemm-transA", _with_model(lambda: _gemm_only(1), _data(x=((16, 4, 1), np.float32)))),
    Case("model-gemm-transA-transB", _with_model(lambda: _gemm_only(1, 1), _data(x=((16, 4, 1), np.float32)))),
    Case("model-gemm-plain", _with_model(lambda: _gemm_only(0), _data(x=((16, 4), np.float32)))),
    Case("model-matmul-chain", _with_model(_matmul_chain, _data(x=((16, 4), np.float32)))),
    Case("model-no-nodes", _with_model(_no_nodes)),
    Case("model-identity-only", _with_model(_identity_only)),
    Case("model-scalar-input", _with_model(_scalar_input, _data(x=((16,), np.float32)))),
    Case("model-scalar-input-2d-data", _with_model(_scalar_input, _data(x=((16, 1), np.float32)))),
    Case("model-lstm", _with_model(_lstm, _data(x=((16, 4, 1, 3), np.float32)))),
    Case("model-two-inputs", _with_model(_two_inputs, _data(x=((16, 3, 8, 8), np.float32), z=((16, 5), np.float32)))),
    Case("model-two-inputs-one-array", _with_model(_two_inputs)),
    Case("model-int-input", _with_model(_int_input, _data(x=((16, 6), np.int64)))),
    Case("model-int-input-float-data", _with_model(_int_input, _data(x=((16, 6), np.float32)))),
    Case("model-custom-domain-op", _with_model(_custom_domain)),
    Case("model-unknown-op", _with_model(_unknown_op)),
    Case("model-undefined-input", _with_model(_undefined_input)),
    Case("model-cycle", _with_model(_cycle)),
    Case("model-initializers-as-inputs-ir3", _with_model(_initializer_as_input)),
    Case("model-overridable-initializers", _with_model(_overridable_initializers)),
    Case("model-dynamic-hw", _with_model(_dynamic_everything)),
    Case("model-input-without-shape", _with_model(_no_shape)),
    Case("model-huge-declared-output", _with_model(_huge_declared)),
    *[Case(f"model-ir-{ir}", _with_model(_ir(ir))) for ir in (0, 3, 4, 11, 99)],
    Case("model-if-subgraph", _with_model(_if_subgraph)),
    Case("model-batchnorm-zero-var", _with_model(_batchnorm)),
    Case("model-external-valid", _external("valid")),
    Case("model-external-onnx-saved", _external_real),
    Case("model-external-longer", _external("longer")),
    Case("model-external-shorter", _external("shorter")),
    Case("model-external-offset-past-end", _external("offset")),
    Case("model-external-self", _external("self"), fast=True),
    Case("model-external-escape", _external("escape"), fast=True),
    Case("model-external-absolute", _external("absolute")),
    Case("model-external-missing", _external("missing")),
    Case("model-external-is-folder", _external("folder")),
]
