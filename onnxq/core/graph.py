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

from onnxq.core import mapped, memory
from onnxq.core.files import TEMP_SUFFIX, atomic_write, file_mode, same_file
from onnxq.errors import UserError

log = logging.getLogger(__name__)

MIN_OPSET = 11
PROTO_LIMIT = 2**31 - 2**20  # a little under 2 GB
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
    """Load an ONNX file (external data included), or raise a one-line UserError.

    External data is read only from files inside the model's folder (onnx refuses others) that are
    not the model file itself; tensors whose bytes do not match their shape, and float weights that
    are NaN or infinite, are refused here, before any work. Weights of
    :data:`~onnxq.core.mapped.MAPPED_MIN_BYTES` or more are read in place (:mod:`onnxq.core.mapped`):
    external data from their files, in-file weights from a temporary copy.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a folder: pass the .onnx file itself")
    if p.stat().st_size == 0:
        raise UserError(f"{p} is empty: re-export the model")
    try:
        model = onnx.load(str(p), load_external_data=False)
        external = external_data_files(model, p)
        in_place = bool(external) and mapped.external_bytes(model) >= mapped.MAPPED_MIN_BYTES
        if in_place:
            problems = mapped.attach(model, p.parent)
            if problems:
                raise UserError(f"{p}: {problems[0]}: fix the export")
        elif external:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        if not in_place and mapped.in_file_bytes(model) >= mapped.MAPPED_MIN_BYTES:  # before any check copies it
            log.debug("%s: %d bytes of weights moved to a temporary file, read in place", p, mapped.spill(model))
            # protobuf keeps a cleared field's bytes in the message's arena: a fresh parse lets them go
            model = onnx.ModelProto.FromString(model.SerializeToString())
            memory.trim()
            in_place = True
    except UserError:
        raise
    except Exception as exc:  # protobuf DecodeError, external data errors, ...
        raise UserError(f"{p} is not a readable ONNX model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'}): "
                        "check the file is a complete .onnx export") from None
    if len(model.graph.node) == 0:
        raise UserError(f"{p} holds no graph nodes: it is not an ONNX model or is truncated")
    small = proto_size(model) < PROTO_LIMIT
    try:
        onnx.checker.check_model(model if small and not in_place else str(p))
    except Exception as exc:
        raise UserError(f"{p} fails the ONNX checker ({str(exc).splitlines()[0]}): fix the export first") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UserError(f"{p} uses opset {opset}; onnxq needs opset >= {MIN_OPSET}: re-export with a newer opset")
    check_initializers(model, p)
    if small:  # shape inference needs the serialised model
        check_declared_shapes(model, p)
    densify_sparse_initializers(model)
    return model


def check_declared_shapes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model whose declared tensor shapes contradict what its ops compute (onnxruntime may
    run it, but every tool that trusts the declarations, ours included, would be misled). For models
    under protobuf's 2 GB limit."""
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "existing shape differ" in text or "existing type differ" in text:
            detail = text.split("Inference error(s): ")[-1][:300]
            raise UserError(f"{path}: a declared shape or type contradicts the ops ({detail}): fix the "
                            "graph's declared inputs, outputs or value_info") from None


def densify_sparse_initializers(model: onnx.ModelProto) -> None:
    """Turn the graph's sparse initializers into dense ones (same name, dtype and shape)."""
    for sparse in model.graph.sparse_initializer:
        values = onnx.numpy_helper.to_array(sparse.values)
        coords = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        # 1-D: linear indices; 2-D: one row of coordinates per value.
        flat = np.asarray(np.ravel_multi_index(tuple(coords.T), dims) if coords.ndim == 2 else coords)
        dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
        dense[flat] = values
        model.graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
    del model.graph.sparse_initializer[:]


def model_files(path: str | Path) -> list[Path]:
    """The model file and the external data files it names (what a run reads and must never write)."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # unreadable: load_model says why
        return [p]
    return [p, *external_data_files(model, p)]


def external_data_files(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The distinct external data files of ``model`` (loaded without them) saved at ``path``."""
    found: dict[Path, None] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = onnx.external_data_helper.ExternalDataInfo(tensor).location
        file = path.parent / location
        if same_file(file, path):
            raise UserError(f"{path}: tensor {tensor.name!r} keeps its data in the model file itself "
                            f"({location!r}): re-export with a separate external data file")
        found[file] = None
    return list(found)


def proto_size(model: onnx.ModelProto) -> int:
    """The serialised size of ``model`` in bytes, or ``2**31`` past protobuf's 2 GB limit (where
    ``ByteSize`` raises "Failed to serialize proto" or overflows)."""
    try:
        size = model.ByteSize()
    except Exception:  # google.protobuf.message.EncodeError
        return 2**31
    return 2**31 if size < 0 or size >= PROTO_LIMIT else size


def check_initializers(model: onnx.ModelProto, path: Path) -> None:
    """Refuse initializers whose bytes do not fit their shape, and float ones with NaN or infinity."""
    for init in model.graph.initializer:
        if mapped.is_mapped(init):  # mapped.attach checked the length
            _check_finite(init.name, mapped.values(init), path)
            continue
        if not init.HasField("raw_data"):
            continue
        if init.data_type in mapped.PACKED_TYPES:
            continue
        try:
            np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        except (KeyError, TypeError, ValueError):
            continue  # a type onnxruntime checks itself
        count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        if len(init.raw_data) != count * np_dtype.itemsize:
            raise UserError(f"{path}: initializer {init.name!r} holds {len(init.raw_data)} bytes but its shape "
                            f"{list(init.dims)} needs {count * np_dtype.itemsize}: fix the export")
        if count:
            _check_finite(init.name, np.frombuffer(init.raw_data, dtype=np_dtype), path)


def _check_finite(name: str, values: np.ndarray, path: Path) -> None:
    """Refuse float ``values`` with NaN or infinity (checked 16 M values at a time)."""
    if not (values.dtype.kind == "f" or "float" in values.dtype.name):
        return
    flat = values.reshape(-1)
    for start in range(0, flat.size, 1 << 24):
        if not np.isfinite(flat[start:start + (1 << 24)]).all():
            raise UserError(f"{path}: initializer {name!r} holds NaN or infinite values: "
                            "fix the trained weights or the export")


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
    """ONNX shape inference (data propagation on); falls back to the input model on failure.

    A model over 2 GB cannot be serialised for the inference: it runs on a skeleton (the graph with
    each initializer's name, type and shape but no data) and the inferred ``value_info`` is copied
    back into ``model``, which is returned (changed in place).
    """
    try:
        if proto_size(model) < PROTO_LIMIT:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), data_prop=True)
        known = {v.name for v in model.graph.value_info}
        model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        return model
    except Exception as exc:  # shape inference is a help, never a requirement
        log.warning("shape inference failed (%s); continuing without it", str(exc).splitlines()[0])
        return model


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without tensor data: initializers keep name, type and shape (marked external, so no
    tool reads their missing bytes)."""
    inits = []
    for init in model.graph.initializer:
        meta = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        meta.data_location = onnx.TensorProto.EXTERNAL
        meta.external_data.add(key="location", value="skeleton-has-no-data")
        inits.append(meta)
    g = model.graph
    graph = onnx.helper.make_graph(g.node, g.name, g.input, g.output, inits, value_info=g.value_info)
    skeleton = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    return skeleton


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """A graphsurgeon graph of ``model`` (mapped constants read in place: :mod:`onnxq.core.mapped`)."""
    graph = gs.import_onnx(model)
    mapped.wrap(graph)
    return graph


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; keeps the template's ir_version/producer/metadata when given."""
    _repack_low_bit(graph)
    mapped.release(graph)
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
    if source is not None and out.exists() and same_file(out, Path(source)):
        raise UserError(f"output path {out} is the input model: choose another -o path "
                        "(the input is never overwritten)")
    if out.is_dir():
        raise UserError(f"output path {out} is a folder: name the .onnx file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    in_place = bool(mapped.mapped_tensors(model))
    if proto_size(model) < PROTO_LIMIT and not in_place:
        return atomic_write(out, lambda tmp: onnx.save_model(model, tmp))
    data_name = external_data_path(out).name
    staged = out.parent / (data_name + TEMP_SUFFIX)

    def write(tmp: str) -> None:
        if in_place:  # weights still in the input's data file: copied into the output's, named as final
            mapped.write_external(model, tmp, staged, data_name)
        else:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=staged.name, size_threshold=1024)
        os.chmod(staged, file_mode())
        os.replace(staged, out.parent / data_name)
        if not in_place:
            _rename_external_location(tmp, staged.name, data_name)

    try:
        return atomic_write(out, write)
    finally:
        staged.unlink(missing_ok=True)


def external_data_path(out: Path) -> Path:
    """Where :func:`save_model` keeps the weights of a model over 2 GB: ``<name>.onnx.data`` beside it."""
    return out.with_name(out.name + ".data")


def _rename_external_location(model_path: str, old: str, new: str) -> None:
    m = onnx.load(model_path, load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, model_path)


def serialize_for_ort(model: onnx.ModelProto) -> tuple[bytes | str, dict[str, str]]:
    """What onnxruntime.InferenceSession accepts (bytes, or a temp path for >2 GB models) and the session
    config entries it needs (the folder of mapped weights, :func:`onnxq.core.mapped.ort_bytes`)."""
    if proto_size(model) < PROTO_LIMIT:
        data, folder = mapped.ort_bytes(model)
        return data, mapped.session_config(folder)
    if mapped.mapped_tensors(model):
        raise ValueError("a model over 2 GB that still holds mapped weights: quantize them before running it")
    folder = tempfile.mkdtemp(prefix="onnxq_")
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
    return path, {}
