"""AIMET-style quantization encodings JSON for a QDQ model (input to Qualcomm's QNN tools).

Format: AIMET's encoding file, version "0.6.1" (described in the AIMET documentation,
``Docs/api_docs/quantization_encoding_specification.rst`` in github.com/quic/aimet)::

    {
      "version": "0.6.1",
      "activation_encodings": {<tensor>: [Encoding]},
      "param_encodings":      {<tensor>: [Encoding, ...]},     # one Encoding per channel if per-channel
      "quantizer_args": {"activation_bitwidth": int, "param_bitwidth": int, "dtype": "int",
                         "is_symmetric": "True", "per_channel_quantization": "True" | "False"}
    }
    Encoding = {"bitwidth": int, "dtype": "int", "is_symmetric": "True" | "False",
                "scale": float, "offset": int, "min": float, "max": float}

AIMET's grid is unsigned: x = (q + offset) * scale with q in [0, 2^bitwidth - 1], so
``min = offset * scale`` and ``max = (offset + 2^bitwidth - 1) * scale``. An ONNX grid
x = (q - z) * s with q in [qmin, qmax] (qmin = 0 unsigned, -2^(b-1) signed) maps to it with
``offset = qmin - z``: uint8 with z = 114 gives offset -114; int8 symmetric (z = 0) gives
offset -128. ``is_symmetric`` is "True" for signed grids with z = 0.

Keys: an activation is named by the float tensor its QuantizeLinear reads, or by the graph output
its DequantizeLinear produces (the name the float model had); a parameter by its quantized
initializer's name without the ``_quantized`` suffix (onnxq's and onnxruntime's convention), i.e.
the float model's weight name. INT32 biases are left out (QNN derives bias encodings from
s_in * s_w itself); so are Q/DQ inside subgraphs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnxq.core.files import atomic_write_text
from onnxq.core.qdq import base_of
from onnxq.targets.rules import QDQGraph

log = logging.getLogger(__name__)

VERSION = "0.6.1"
_BITS = {TensorProto.UINT8: (8, False), TensorProto.INT8: (8, True), TensorProto.UINT16: (16, False),
         TensorProto.INT16: (16, True), TensorProto.UINT4: (4, False), TensorProto.INT4: (4, True)}


def encoding(scale: float, zero_point: int, bits: int, signed: bool) -> dict[str, Any]:
    """One AIMET Encoding of the grid x = (q - z) * s, q in [qmin, qmin + 2^bits - 1]."""
    qmin = -(2 ** (bits - 1)) if signed else 0
    offset = int(qmin - zero_point)
    scale = float(scale)
    return {
        "bitwidth": int(bits), "dtype": "int", "is_symmetric": str(bool(signed and zero_point == 0)),
        "scale": scale, "offset": offset, "min": offset * scale, "max": (offset + 2**bits - 1) * scale,
    }


def _strip(name: str) -> str:
    """The quantized tensor's name for a Q output or a weight's codes (the name itself otherwise)."""
    return base_of(name, "quantized") or name


def encodings_dict(model: onnx.ModelProto) -> dict[str, Any]:
    """The encodings of every activation and weight Q/DQ in ``model``'s top-level graph."""
    g = ck = QDQGraph(model)
    acts: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    act_bits: set[int] = set()
    param_bits: set[int] = set()
    per_channel = False
    for node in g.nodes:
        if node.op_type == "QuantizeLinear":
            scale, zp, dtype = ck.qparams(node)
            if scale is None or dtype not in _BITS:
                continue
            bits, signed = _BITS[dtype]
            key = node.input[0]
            for user in g.consumers.get(node.output[0], []):
                if user.op_type == "Clip":  # QCDQ: the Clip bounds are the real grid
                    lo, hi = g.const(user.input[1]), g.const(user.input[2]) if len(user.input) > 2 else None
                    if lo is not None and hi is not None:
                        bits = int(round(math.log2(int(hi) - int(lo) + 1)))
                        signed = int(lo) < 0
                    user = (g.consumers.get(user.output[0]) or [user])[0]
                if user.op_type == "DequantizeLinear" and user.output[0] in g.outputs:
                    key = user.output[0]
            acts[key] = [encoding(np.ravel(scale)[0], int(np.ravel(zp)[0]), bits, signed)]
            act_bits.add(bits)
        elif node.op_type == "DequantizeLinear" and node.input[0] in g.consts and ck.role(node) == "weight":
            scale, zp, dtype = ck.qparams(node)
            if scale is None or dtype not in _BITS:
                continue
            bits, signed = _BITS[dtype]
            s, z = np.ravel(scale), np.broadcast_to(np.ravel(zp), np.ravel(scale).shape)
            params[_strip(node.input[0])] = [encoding(si, int(zi), bits, signed) for si, zi in zip(s, z)]
            param_bits.add(bits)
            per_channel |= s.size > 1
    return {
        "version": VERSION,
        "activation_encodings": acts,
        "param_encodings": params,
        "quantizer_args": {
            "activation_bitwidth": max(act_bits, default=8), "param_bitwidth": max(param_bits, default=8),
            "dtype": "int", "is_symmetric": "True", "per_channel_quantization": str(per_channel),
        },
    }


def write_encodings(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write :func:`encodings_dict` of ``model`` as JSON to ``path`` (atomically); returns the path."""
    out = Path(path)
    data = encodings_dict(model)
    atomic_write_text(out, json.dumps(data, indent=2))
    log.info("wrote %s (%d activation, %d param encodings)", out, len(data["activation_encodings"]),
             len(data["param_encodings"]))
    return out
