"""Check the ternary weights of a written QDQ model and measure their sparsity and size.

Which tensors are ternary: the integer constants listed in the model's metadata entry
``onnxq.ternary_codes`` (JSON ``{codes constant: weight name}``, written by :func:`mark_two_bit_codes`
for every weight whose QuantSpec is ternary), plus every int2 constant read by a DequantizeLinear,
directly or through the Cast to int8 that :mod:`onnxq.core.weight_cast` puts in front of it, unless the
entry ``onnxq.int2_codes`` lists it as a weight on the 4-level INT2 grid [-2, 1]
(``QuantConfig.int2_grid="uniform"``), whose codes may be -2. The check reads the stored values,
whatever the container (int2, int4, int8), and flags every code outside {-1, 0, 1}.

Per tensor with n codes and k scales (float32):

    sparsity        = #{codes == 0} / n
    fp32_bytes      = 4 n                          (the float weight it replaces)
    effective_bytes = ceil(2 n / 8) + 4 k          (2 bits a weight plus the scales)
    file_bytes      = stored bytes of the codes constant + of its scale constant
                      (int2: n / 4, int4: n / 2, int8: n, rounded up; plus 4 k)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnxq.core import mapped
from onnxq.core.qdq import base_of
from onnxq.core.weight_cast import cast_source, constant_types, folded_casts

log = logging.getLogger(__name__)

METADATA_KEY = "onnxq.ternary_codes"
INT2_METADATA_KEY = "onnxq.int2_codes"
_CONTAINERS = {TensorProto.INT2: "int2", TensorProto.INT4: "int4", TensorProto.INT8: "int8",
               TensorProto.UINT2: "uint2", TensorProto.UINT4: "uint4", TensorProto.UINT8: "uint8",
               TensorProto.INT16: "int16", TensorProto.INT32: "int32"}


def mark_two_bit_codes(model: onnx.ModelProto, codes: Mapping[str, str],
                       key: str = METADATA_KEY) -> None:
    """Record 2-bit code constants (``{constant name: weight name}``) in the model's metadata under
    ``key``: the ternary ones (``METADATA_KEY``) or the 4-level INT2 ones (``INT2_METADATA_KEY``)."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if codes:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(dict(sorted(codes.items())), separators=(",", ":"))


def _listed(model: onnx.ModelProto, key: str) -> dict[str, str]:
    """A metadata entry's ``{codes constant: weight name}``; an unreadable one as ``{"<metadata>": message}``."""
    out: dict[str, str] = {}
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                out.update({str(k): str(v) for k, v in json.loads(prop.value).items()})
            except (ValueError, AttributeError):
                out["<metadata>"] = f"unreadable {key} entry"
    return out


@dataclass(frozen=True)
class TernaryLayer:
    """One ternary weight tensor as written (see the module docstring for the sizes)."""

    weight: str
    codes: str
    container: str
    shape: tuple[int, ...]
    zeros: int
    scales: int
    file_bytes: int
    bad_values: int
    bad_examples: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def sparsity(self) -> float:
        return self.zeros / self.n if self.n else 0.0

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.n

    @property
    def effective_bytes(self) -> int:
        return math.ceil(2 * self.n / 8) + 4 * self.scales

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "codes": self.codes, "container": self.container, "shape": list(self.shape),
                "n": self.n, "sparsity": round(self.sparsity, 6), "scales": self.scales,
                "fp32_bytes": self.fp32_bytes, "effective_bytes": self.effective_bytes,
                "file_bytes": self.file_bytes, "values_ok": self.bad_values == 0}


@dataclass(frozen=True)
class TernaryReport:
    """Every ternary tensor of a model, the violations, and the totals."""

    layers: tuple[TernaryLayer, ...]
    violations: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.violations

    def totals(self) -> dict[str, Any]:
        n = sum(x.n for x in self.layers)
        fp32 = sum(x.fp32_bytes for x in self.layers)
        eff = sum(x.effective_bytes for x in self.layers)
        file = sum(x.file_bytes for x in self.layers)
        return {"layers": len(self.layers), "n": n,
                "sparsity": round(sum(x.zeros for x in self.layers) / n, 6) if n else 0.0,
                "fp32_bytes": fp32, "effective_bytes": eff, "file_bytes": file,
                "effective_vs_fp32": round(eff / fp32, 6) if fp32 else None,
                "file_vs_fp32": round(file / fp32, 6) if fp32 else None,
                "containers": sorted({x.container for x in self.layers})}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "violations": list(self.violations), "total": self.totals(),
                "layers": [x.to_dict() for x in self.layers]}

    def summary(self) -> str:
        t = self.totals()
        text = (f"ternary weights: {t['layers']} tensors ({', '.join(t['containers']) or '-'}), sparsity "
                f"{100 * t['sparsity']:.1f}%, {t['file_bytes']} file bytes vs {t['fp32_bytes']} FP32 "
                f"(effective 2-bit size {t['effective_bytes']})")
        return text + "".join(f"\nerror: {v}" for v in self.violations)


def ternary_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """``{codes constant: weight name}``: the metadata's list plus every int2 DequantizeLinear input
    that is not listed as a 4-level INT2 weight."""
    out = _listed(model, METADATA_KEY)
    uniform = _listed(model, INT2_METADATA_KEY)
    if "<metadata>" in uniform:
        out.setdefault("<metadata>", uniform["<metadata>"])
    types = constant_types(model.graph)
    casts = folded_casts(model.graph)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = cast_source(casts, node.input[0])
        if types.get(src) == TensorProto.INT2 and src not in uniform:
            out.setdefault(src, base_of(src, "quantized") or src)
    return out


def check_ternary(model: onnx.ModelProto) -> TernaryReport | None:
    """Check and measure every ternary tensor of ``model`` (None when it has none).

    A violation (one line each) is a code outside {-1, 0, 1}, a listed tensor that is missing or
    not an integer constant, or an unreadable metadata entry.
    """
    wanted = ternary_tensors(model)
    if not wanted:
        return None
    tensors: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    tensors[node.output[0]] = a.t
    scale_of: dict[str, str] = {}
    casts = folded_casts(model.graph)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            scale_of.setdefault(cast_source(casts, node.input[0]), node.input[1])
    layers, violations = [], []
    for codes_name, weight in sorted(wanted.items()):
        if codes_name == "<metadata>":
            violations.append(weight)
            continue
        proto = tensors.get(codes_name)
        container = _CONTAINERS.get(proto.data_type, str(proto.data_type)) if proto is not None else "?"
        if proto is None or proto.data_type not in _CONTAINERS:
            violations.append(f"ternary weight {weight}: {codes_name} is "
                              f"{'missing' if proto is None else 'not an integer constant'}")
            continue
        codes = mapped.values(proto).astype(np.int64)
        bad = codes[(codes < -1) | (codes > 1)]
        scale = tensors.get(scale_of.get(codes_name, ""))
        n_scales = int(np.prod(scale.dims)) if scale is not None else 0
        layer = TernaryLayer(weight, codes_name, container, tuple(int(d) for d in codes.shape),
                             int(np.sum(codes == 0)), n_scales,
                             _stored_bytes(proto) + (_stored_bytes(scale) if scale is not None else 0),
                             int(bad.size), tuple(int(v) for v in np.unique(bad)[:4]))
        layers.append(layer)
        if bad.size:
            violations.append(f"ternary weight {weight} ({codes_name}, {container}): {bad.size} code(s) outside "
                              f"{{-1, 0, 1}}, e.g. {list(layer.bad_examples)}")
    for v in violations:
        log.error("%s", v)
    return TernaryReport(tuple(layers), tuple(violations))


def _stored_bytes(t: TensorProto) -> int:
    """Bytes the tensor's values take in the file (raw data, external data length, or typed fields)."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    return 4 * (len(t.int32_data) + len(t.float_data)) + 8 * (len(t.int64_data) + len(t.double_data)
                                                              + len(t.uint64_data))
