"""Loading, saving and small graph helpers on top of onnx-graphsurgeon.

Loading turns every way a user can hand us a broken file into a one-line :class:`UserError`.
Saving is atomic (temporary file in the destination folder, then ``os.replace``) and switches to
external data for models over the 2 GB protobuf limit. Low-bit constants (INT4/INT2) go through
``LazyValues`` because graphsurgeon exports unpacked bytes for them otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxq.errors import UserError

log = logging.getLogger(__name__)

MIN_OPSET = 11
_PROTO_LIMIT = 2**31 - 2**20  # a little under 2 GB
_LOW_BIT = ("int4", "uint4", "int2", "uint2")


def is_default_domain(node: gs.Node) -> bool:
    """The node is a standard ONNX op (empty or "ai.onnx" domain)."""
    return node.domain in (None, "", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UserError("the model imports no default ONNX opset: re-export it with a standard exporter")


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (external data included), or raise a one-line UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a folder: pass the .onnx file itself")
    if p.stat().st_size == 0:
        raise UserError(f"{p} is empty: re-export the model")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, external data errors, ...
        raise UserError(f"{p} is not a readable ONNX model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'}): "
                        "check the file is a complete .onnx export") from None
    if len(model.graph.node) == 0:
        raise UserError(f"{p} holds no graph nodes: it is not an ONNX model or is truncated")
    try:
        onnx.checker.check_model(model if model.ByteSize() < _PROTO_LIMIT else str(p))
    except Exception as exc:
        raise UserError(f"{p} fails the ONNX checker ({str(exc).splitlines()[0]}): fix the export first") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UserError(f"{p} uses opset {opset}; onnxq needs opset >= {MIN_OPSET}: re-export with a newer opset")
    return model


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset up to ``opset`` (never down)."""
    current = default_opset(model)
    if current >= opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as exc:
        raise UserError(f"cannot upgrade the model from opset {current} to {opset} "
                        f"({str(exc).splitlines()[0]}): re-export it at opset >= {opset}") from None
    log.info("upgraded opset %d -> %d", current, opset)
    return converted


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (data propagation on); falls back to the input model on failure."""
    try:
        if model.ByteSize() >= _PROTO_LIMIT:
            return model
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shape inference is a help, never a requirement
        log.warning("shape inference failed (%s); continuing without it", str(exc).splitlines()[0])
        return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; keeps the template's ir_version/producer/metadata when given."""
    _repack_low_bit(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    # The lowest IR version the opsets need (onnxruntime refuses IR versions newer than it knows).
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if template is not None:
        model.ir_version = max(model.ir_version, min(template.ir_version, onnx.IR_VERSION))
        for prop in template.metadata_props:
            model.metadata_props.append(prop)
    model.producer_name = "onnxq"
    return model


def _repack_low_bit(graph: gs.Graph) -> None:
    """Reading ``Constant.values`` turns LazyValues into a plain array, which graphsurgeon then
    exports unpacked for INT4/INT2: wrap such constants again before every export."""
    for tensor in graph.tensors().values():
        raw = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and isinstance(raw, np.ndarray) and raw.dtype.name in _LOW_BIT:
            tensor._values = LazyValues(onnx.numpy_helper.from_array(raw, tensor.name))


def set_opset(graph: gs.Graph, opset: int) -> None:
    graph.opset = max(graph.opset, opset)
    if graph.import_domains is not None:
        kept = [d for d in graph.import_domains if d.domain not in ("", "ai.onnx")]
        graph.import_domains = kept + [onnx.helper.make_opsetid("", graph.opset)]


class FreshNames:
    """Fresh tensor/node names for one graph (passes never reuse a name)."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def constant(name: str, values: np.ndarray) -> gs.Constant:
    """A graphsurgeon Constant that exports correctly for any dtype, INT4/INT2 included."""
    arr = np.asarray(values)
    if arr.dtype.name in _LOW_BIT:
        return gs.Constant(name, values=LazyValues(onnx.numpy_helper.from_array(arr, name)))
    return gs.Constant(name, values=arr)


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The numpy value of a Constant tensor, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def save_model(model: onnx.ModelProto, path: str | Path, *, source: str | Path | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; refuses to overwrite ``source`` (the input model)."""
    out = Path(path)
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise UserError(f"output path {out} is the input model: choose another -o path "
                        "(the input is never overwritten)")
    if out.is_dir():
        raise UserError(f"output path {out} is a folder: name the .onnx file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() >= _PROTO_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if big:
            data_name = out.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name + ".tmp", size_threshold=1024)
            os.replace(out.parent / (data_name + ".tmp"), out.parent / data_name)
            _rename_external_location(tmp, data_name + ".tmp", data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _rename_external_location(model_path: str, old: str, new: str) -> None:
    m = onnx.load(model_path, load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, model_path)


def serialize_for_ort(model: onnx.ModelProto) -> bytes | str:
    """What onnxruntime.InferenceSession accepts: bytes, or a temp path for >2 GB models."""
    if model.ByteSize() < _PROTO_LIMIT:
        return model.SerializeToString()
    folder = tempfile.mkdtemp(prefix="onnxq_")
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
    return path
