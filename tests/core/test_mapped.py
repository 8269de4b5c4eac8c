"""Weights read in place from the user's external data file (onnxq.core.mapped): the run that never copies
the float weights gives exactly the model the in-memory run gives, writes float weights it keeps into its
own data file, never touches the input, and refuses external data that do not fit their tensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxq.api import quantize
from onnxq.config import GPTQ, Config, QuantConfig, RoundToNearest
from onnxq.core import graph as g
from onnxq.core import mapped, memory
from onnxq.errors import UserError
from tests.fuzz.harness import sha256_of


def _external_mlp(folder: Path, seed: int = 0) -> Path:
    """x[N, 64] -> Gemm(W0, b0) -> Relu -> MatMul(W1) -> Relu -> Gemm(W2, transB) -> y, every weight in
    ``model.onnx.data``."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((64, 48)) * 0.2).astype(np.float32)
    b0 = (rng.standard_normal(48) * 0.1).astype(np.float32)
    w1 = (rng.standard_normal((48, 40)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((10, 40)) * 0.2).astype(np.float32)
    nodes = [h.make_node("Gemm", ["x", "W0", "b0"], ["g0"], name="fc0"),
             h.make_node("Relu", ["g0"], ["r0"], name="relu0"),
             h.make_node("MatMul", ["r0", "W1"], ["m1"], name="mm1"),
             h.make_node("Relu", ["m1"], ["r1"], name="relu1"),
             h.make_node("Gemm", ["r1", "W2"], ["y"], name="fc2", transB=1)]
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                         [nh.from_array(w0, "W0"), nh.from_array(b0, "b0"), nh.from_array(w1, "W1"),
                          nh.from_array(w2, "W2")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _calib(n: int = 48, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(n // 8)]


@pytest.fixture
def in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every external data file is read in place, however small."""
    monkeypatch.setattr(mapped, "MAPPED_MIN_BYTES", 0)


def test_load_maps_external_weights_without_reading_them(tmp_path: Path, in_place: None) -> None:
    path = _external_mlp(tmp_path)
    model = g.load_model(path)
    tensors = {t.name: t for t in model.graph.initializer}
    assert {t.name for t in mapped.mapped_tensors(model)} == {"W0", "b0", "W1", "W2"}
    assert all(not t.HasField("raw_data") for t in tensors.values())
    full = onnx.load(str(path))
    for t in full.graph.initializer:
        values = mapped.values(tensors[t.name])
        assert isinstance(values, np.memmap) and not values.flags.writeable
        np.testing.assert_array_equal(values, nh.to_array(t))


def test_small_external_data_is_loaded_into_memory(tmp_path: Path) -> None:
    model = g.load_model(_external_mlp(tmp_path))  # far under MAPPED_MIN_BYTES
    assert not mapped.mapped_tensors(model)
    assert all(t.HasField("raw_data") for t in model.graph.initializer)


def _method(name: str) -> Config | QuantConfig:
    if name == "qdrop":  # the torch engine reads the float weights from the maps
        return QuantConfig(weight_bits=4, activation_bits=8, method="qdrop", recon_iters=8, recon_samples=16,
                           recon_batch_size=8)
    return Config() if name == "gptq" else dataclasses.replace(Config(), rounding=RoundToNearest())


@pytest.mark.parametrize("method", ["rtn", "gptq", "qdrop"])
def test_in_place_run_gives_the_in_memory_model_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       method: str) -> None:
    path = _external_mlp(tmp_path / "in")
    before = {p.name: sha256_of(p) for p in path.parent.iterdir()}
    config = _method(method)
    in_memory = quantize(path, _calib(), config)
    monkeypatch.setattr(mapped, "MAPPED_MIN_BYTES", 0)
    read_in_place = quantize(path, _calib(), config)
    assert not mapped.mapped_tensors(read_in_place.model)  # every weight quantized: nothing left in the input
    assert read_in_place.model.SerializeToString() == in_memory.model.SerializeToString()
    assert read_in_place.report["validation"] == in_memory.report["validation"]
    assert read_in_place.report["weight_rounding"] == in_memory.report["weight_rounding"]
    assert {p.name: sha256_of(p) for p in path.parent.iterdir()} == before


def test_a_float_weight_kept_in_place_is_copied_into_the_output(tmp_path: Path, in_place: None) -> None:
    path = _external_mlp(tmp_path / "in")
    before = {p.name: sha256_of(p) for p in path.parent.iterdir()}
    config = dataclasses.replace(Config(), rounding=RoundToNearest(), exclude=("mm1",))
    result = quantize(path, _calib(), config)
    kept = [t.name for t in mapped.mapped_tensors(result.model)]
    assert kept == ["W1"]  # still read from the input until written
    assert result.validation is not None and result.validation.ok
    out = result.save(tmp_path / "out" / "q.onnx")
    data = g.external_data_path(out)
    assert data.is_file()
    saved = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data.name}  # relative, beside the output: nothing points into the input folder
    np.testing.assert_array_equal(nh.to_array(next(t for t in onnx.load(str(out)).graph.initializer
                                                   if t.name == "W1")),
                                  nh.to_array(next(t for t in onnx.load(str(path)).graph.initializer
                                                   if t.name == "W1")))
    assert [t.name for t in mapped.mapped_tensors(result.model)] == ["W1"]  # saving leaves the model as it was
    feed = _calib(8, seed=5)[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.allclose(got, want, atol=0.1)
    assert {p.name: sha256_of(p) for p in path.parent.iterdir()} == before


def test_release_hands_read_weights_back_and_export_reuses_the_record(tmp_path: Path, in_place: None) -> None:
    graph = g.to_graph(g.load_model(_external_mlp(tmp_path)))
    w0 = graph.tensors()["W0"]
    assert isinstance(w0._values, mapped.MappedValues)
    first = np.array(w0.values)
    assert isinstance(w0._values, np.memmap)
    graph.tensors()["W2"].values = np.zeros((10, 40), np.float32)  # a pass's new value stays
    assert mapped.release(graph) == 1
    assert isinstance(w0._values, mapped.MappedValues)
    np.testing.assert_array_equal(w0.values, first)
    model = g.to_model(graph)
    inits = {t.name: t for t in model.graph.initializer}
    assert mapped.is_mapped(inits["W0"]) and not mapped.is_mapped(inits["W2"])


def test_drop_pages_keeps_the_values(tmp_path: Path, in_place: None) -> None:
    model = g.load_model(_external_mlp(tmp_path))
    w = mapped.values(model.graph.initializer[0])
    view = np.asarray(w, dtype=np.float32)[1:]
    copy = np.array(w)
    mapped.drop_pages(view)
    mapped.drop_pages(copy)  # not a map: nothing happens
    np.testing.assert_array_equal(w, copy)
    memory.trim()


def test_onnxruntime_and_the_checker_read_a_model_with_mapped_weights(tmp_path: Path, in_place: None) -> None:
    path = _external_mlp(tmp_path)
    model = g.load_model(path)
    data, folder = mapped.ort_bytes(model)
    assert folder == str(path.parent.resolve())
    assert all(mapped.is_mapped(t) for t in model.graph.initializer)  # locations restored
    opts = ort.SessionOptions()
    for key, value in mapped.session_config(folder).items():
        opts.add_session_config_entry(key, value)
    feed = _calib(8)[0]
    got = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)
    with mapped.checkable_path(model) as checked:
        onnx.checker.check_model(checked, full_check=True)
    assert not Path(checked).exists()


def test_external_data_shorter_than_the_tensor_is_one_line(tmp_path: Path, in_place: None) -> None:
    path = _external_mlp(tmp_path)
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(UserError, match="needs .* fix the export"):
        g.load_model(path)


def test_nan_in_a_mapped_weight_is_refused(tmp_path: Path, in_place: None) -> None:
    path = _external_mlp(tmp_path)
    data = path.parent / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0:4] = np.array([np.nan], np.float32).tobytes()
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="NaN or infinite"):
        g.load_model(path)


def test_gptq_moments_stay_within_their_budget(tmp_path: Path) -> None:
    """The widest layer inputs round to nearest once their second moments pass ``moments_mb``."""
    path = _external_mlp(tmp_path)
    full = quantize(path, _calib(), Config())
    assert "gptq_moments_over_budget" not in full.report
    assert full.report["calibration"]["layer_moments"] == 3
    tight = quantize(path, _calib(), dataclasses.replace(Config(), rounding=GPTQ(moments_mb=0)))
    assert tight.report["gptq_moments_over_budget"] == ["g0", "m1", "y"]
    assert tight.report["calibration"].get("layer_moments", 0) == 0
    nearest = quantize(path, _calib(), dataclasses.replace(Config(), rounding=RoundToNearest()))
    assert tight.model.SerializeToString() == nearest.model.SerializeToString()
    with pytest.raises(UserError, match="moments_mb"):
        GPTQ(moments_mb=-1)


def test_in_file_weights_are_moved_to_a_temporary_file_and_give_the_same_model(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    single = tmp_path / "single" / "model.onnx"
    single.parent.mkdir()
    onnx.save_model(onnx.load(str(_external_mlp(tmp_path / "ext"))), single)  # every weight in the file
    before = sha256_of(single)
    config = dataclasses.replace(Config(), rounding=RoundToNearest(), exclude=("mm1",))
    in_memory = quantize(single, _calib(), config)
    monkeypatch.setattr(mapped, "MAPPED_MIN_BYTES", 0)
    model = g.load_model(single)
    spilled = mapped.mapped_tensors(model)
    assert {t.name for t in spilled} == {"W0", "W1"}  # W2 and b0 (under 4 KiB) stay in the proto
    assert all(not mapped.values(t).flags.writeable for t in spilled)
    assert Path(onnx.external_data_helper.ExternalDataInfo(spilled[0]).location).parent != single.parent
    read_in_place = quantize(single, _calib(), config)
    assert [t.name for t in mapped.mapped_tensors(read_in_place.model)] == ["W1"]  # kept float, still mapped
    out_a, out_b = in_memory.save(tmp_path / "a" / "q.onnx"), read_in_place.save(tmp_path / "b" / "q.onnx")
    feed = _calib(8, seed=7)[0]
    run = [ort.InferenceSession(str(o), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for o in (out_a, out_b)]
    np.testing.assert_array_equal(run[0], run[1])
    assert sha256_of(single) == before
