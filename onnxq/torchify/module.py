"""BlockModule: a topologically ordered list of ONNX nodes run in torch as one differentiable module.

The module keeps an environment ``tensor name -> Tensor``: the block inputs are bound to the
positional ``forward`` arguments, constants are module buffers (so ``.to(device)`` moves them),
and every node writes its outputs. Two substitutions make a QDQ block trainable:

  * a weight ``DequantizeLinear`` whose output name (``"<w>_dequantized"``) is a key of
    ``weight_quantizers`` is not run; its output is ``weight_quantizers[name]()``;
  * an activation pair ``t -> QuantizeLinear -> DequantizeLinear`` whose Q input name ``t`` is a
    key of ``act_quantizers`` becomes one call ``act_quantizers[t](env[t])``, whose value every
    DequantizeLinear of that Q output receives. Clip nodes between Q and DQ (QCDQ: a 4-bit grid
    in an 8-bit container) are part of the replaced pattern; the quantizer must apply that grid.
    A Clip with constant bounds *before* the Q (a ReLU6: ``y -> Clip -> t -> Q``), whose output only
    that Q reads, is handed to a quantizer that declares ``fuses_clip`` as ``quantizer(y, clip=(lo,
    hi))`` and not run: the quantizer clips in its own pass (same values and gradients). Likewise the
    asymmetric zero padding of a 2-D Conv that alone reads the pair's output (TensorFlow's "same"
    padding, which torch's convolutions cannot do themselves) goes to a quantizer that declares
    ``fuses_pad`` as ``pad=((top, bottom), (left, right))``, and the Conv runs unpadded on its padded output.

All other nodes (other Q/DQ nodes included) run the generic op functions of the registry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import Tensor, nn

from onnxq.torchify.registry import OPS, OpFn, is_omitted, node_attrs, supported

log = logging.getLogger(__name__)

# A reference to a value: ("env", tensor name), ("buf", buffer name) or None (omitted input).
_Ref = tuple[str, str] | None


@dataclass(frozen=True)
class _Step:
    kind: str                    # "op" | "weight" | "act"
    name: str                    # node name (for errors)
    op: str                      # ONNX op type of the node
    fn: OpFn | None
    attrs: Mapping[str, Any]
    inputs: tuple[_Ref, ...]
    outputs: tuple[str, ...]     # "" for unused outputs
    quantizer: str = ""          # ModuleDict key for "weight" / "act"
    free: tuple[str, ...] = ()   # env names dead after this step
    clip: tuple[float, float] | None = None  # "act": a Clip before the Q, fused into the quantizer
    pad: tuple[tuple[int, int], tuple[int, int]] | None = None  # "act": the next Conv's padding, fused


def _sanitize(name: str, prefix: str, taken: set[str]) -> str:
    base = prefix + re.sub(r"\W", "_", name)
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def constant_tensor(values: np.ndarray) -> Tensor:
    """A torch copy of a constant: floats -> float32, bool kept, integers in a torch integer type
    that holds them (int4/int2 -> int8, uint4/uint2 -> uint8, uint16 -> int32, 64-bit -> int64)."""
    a = np.asarray(values)
    name = a.dtype.name
    if a.dtype.kind == "f" or "float" in name:
        a = a.astype(np.float32)
    elif a.dtype == np.bool_ or name in ("int8", "uint8", "int16", "int32", "int64"):
        pass
    elif name in ("int4", "int2"):
        a = a.astype(np.int8)
    elif name in ("uint4", "uint2"):
        a = a.astype(np.uint8)
    elif name == "uint16":
        a = a.astype(np.int32)
    elif a.dtype.kind in "iu":
        a = a.astype(np.int64)
    else:
        raise ValueError(f"constant of dtype {name} cannot become a torch tensor")
    return torch.tensor(a.copy(order="C"))


class BlockModule(nn.Module):
    """A block of ONNX nodes as a torch module (see the module docstring).

    Args:
        nodes: the block's nodes in topological order.
        inputs: names of the block's input tensors (the positional ``forward`` arguments).
        outputs: names of the tensors ``forward`` returns.
        weight_quantizers: weight DQ output name -> module, ``module()`` gives the float weight.
        act_quantizers: activation Q input name -> module, ``module(x)`` gives fake-quantized x.

    Raises:
        ValueError: a node cannot run in torch (names the node and the reason), a tensor is
            neither an input, a constant nor produced earlier, or a quantizer key matches no
            node of the block.
    """

    def __init__(self, nodes: Sequence[gs.Node], inputs: Sequence[str], outputs: Sequence[str], *,
                 weight_quantizers: Mapping[str, nn.Module] | None = None,
                 act_quantizers: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        weight_quantizers = dict(weight_quantizers or {})
        act_quantizers = dict(act_quantizers or {})
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.weight_quantizers = nn.ModuleDict()
        self.act_quantizers = nn.ModuleDict()
        # tensor name -> key in the ModuleDicts (keys are sanitised: no dots)
        self.weight_keys: dict[str, str] = {}
        self.act_keys: dict[str, str] = {}
        taken: set[str] = set()
        for name, mod in weight_quantizers.items():
            key = self.weight_keys[name] = _sanitize(name, "w_", taken)
            self.weight_quantizers[key] = mod
        for name, mod in act_quantizers.items():
            key = self.act_keys[name] = _sanitize(name, "a_", taken)
            self.act_quantizers[key] = mod
        self._buffer_of: dict[str, str] = {}
        self._steps: list[_Step] = self._plan(list(nodes), weight_quantizers, act_quantizers, taken)
        log.debug("BlockModule: %s", self.extra_repr())

    # ------------------------------------------------------------------ construction

    def _const_ref(self, t: gs.Constant, taken: set[str]) -> _Ref:
        ident = t.name or f"#{id(t)}"  # unnamed constants are told apart by identity
        if ident not in self._buffer_of:
            buf = _sanitize(t.name or "const", "c_", taken)
            self.register_buffer(buf, constant_tensor(np.asarray(t.values)), persistent=False)
            self._buffer_of[ident] = buf
        return ("buf", self._buffer_of[ident])

    def _plan(self, nodes: list[gs.Node], wq: Mapping[str, nn.Module], aq: Mapping[str, nn.Module],
              taken: set[str]) -> list[_Step]:
        skip: set[int] = set()
        act_at: dict[int, tuple[str, list[str]]] = {}  # Q node index -> (input name, DQ outputs)
        weight_at: dict[int, str] = {}
        for i, node in enumerate(nodes):
            if node.op == "DequantizeLinear" and node.outputs[0].name in wq:
                weight_at[i] = node.outputs[0].name
        for name in wq:
            if name not in weight_at.values():
                raise ValueError(f"weight quantizer {name!r}: no DequantizeLinear in the block outputs it")
        for name in aq:
            act_at.update(self._pair(nodes, name, skip))
        readers: dict[str, list[int]] = {}  # tensor name -> the indices of the nodes that read it
        for i, node in enumerate(nodes):
            for t in node.inputs:
                if t is not None and t.name:
                    readers.setdefault(t.name, []).append(i)
        clip_of = self._fusable_clips(nodes, readers, act_at, aq, skip)
        pad_of, unpadded = self._fusable_pads(nodes, readers, act_at, aq)
        steps: list[_Step] = []
        for i, node in enumerate(nodes):
            if i in skip:
                continue
            outs = tuple(t.name for t in node.outputs)
            if i in weight_at:
                key = self.weight_keys[weight_at[i]]
                steps.append(_Step("weight", node.name, node.op, None, {}, (), outs, key))
                continue
            if i in act_at:
                src, dq_outs = act_at[i]
                read, clip = clip_of.get(src, (src, None))
                steps.append(_Step("act", node.name, node.op, None, {}, (("env", read),), tuple(dq_outs),
                                   self.act_keys[src], clip=clip, pad=pad_of.get(src)))
                continue
            reason = supported(node)
            if reason is not None:
                raise ValueError(f"node {node.name!r} ({node.op}) cannot run in torch: {reason}")
            refs = tuple(None if is_omitted(t) else self._const_ref(t, taken) if isinstance(t, gs.Constant)
                         else ("env", t.name) for t in node.inputs)
            attrs = node_attrs(node)
            if i in unpadded:  # its input arrives padded (see the module docstring)
                attrs = {**attrs, "pads": [0] * len(attrs["pads"])}
            steps.append(_Step("op", node.name, node.op, OPS[node.op], attrs, refs, outs))
        return self._liveness(steps)

    @staticmethod
    def _pair(nodes: list[gs.Node], name: str, skip: set[int]) -> dict[int, tuple[str, list[str]]]:
        """The Q of ``name`` and the DQs it feeds, directly or through Clip nodes on the codes
        (QCDQ: sub-8-bit grids stored in 8-bit containers); the Clips and DQs are skipped."""
        qs = [i for i, n in enumerate(nodes) if n.op == "QuantizeLinear" and n.inputs[0].name == name]
        if len(qs) != 1:
            raise ValueError(f"activation quantizer {name!r}: expected one QuantizeLinear of it in the "
                             f"block, found {len(qs)}")
        frontier, dqs, clips = [nodes[qs[0]].outputs[0].name], [], []
        while frontier:
            codes = frontier.pop()
            users = [i for i, n in enumerate(nodes) if any(t.name == codes for t in n.inputs)]
            if not users:
                raise ValueError(f"activation quantizer {name!r}: the codes {codes!r} reach no "
                                 "DequantizeLinear inside the block")
            for i in users:
                node = nodes[i]
                if node.op == "DequantizeLinear" and node.inputs[0].name == codes:
                    dqs.append(i)
                elif node.op == "Clip" and node.inputs[0].name == codes:
                    clips.append(i)
                    frontier.append(node.outputs[0].name)
                else:
                    raise ValueError(f"activation quantizer {name!r}: the codes {codes!r} feed "
                                     f"{node.op} node {node.name!r}; only Clip and DequantizeLinear "
                                     "can follow a replaced QuantizeLinear")
        skip.update(dqs + clips)
        return {qs[0]: (name, [nodes[i].outputs[0].name for i in dqs])}

    def _fusable_clips(self, nodes: list[gs.Node], readers: Mapping[str, list[int]],
                       act_at: Mapping[int, tuple[str, list[str]]], aq: Mapping[str, nn.Module],
                       skip: set[int]) -> dict[str, tuple[str, tuple[float, float]]]:
        """Quantized tensor -> (the Clip's input, its bounds) for each Clip the quantizer takes over (see the
        module docstring); those Clip nodes join ``skip``."""
        producer = {t.name: i for i, n in enumerate(nodes) for t in n.outputs if t.name}
        fused = {}
        for src, _ in act_at.values():
            j = producer.get(src)
            if j is None or not getattr(aq[src], "fuses_clip", False) or src in self.output_names:
                continue
            node = nodes[j]
            bounds = _clip_bounds(node) if node.op == "Clip" else None
            data = node.inputs[0] if node.inputs else None
            if bounds is None or len(readers.get(src, [])) != 1 or data is None or isinstance(data, gs.Constant):
                continue
            fused[src] = (data.name, bounds)
            skip.add(j)
        return fused

    def _fusable_pads(self, nodes: list[gs.Node], readers: Mapping[str, list[int]],
                      act_at: Mapping[int, tuple[str, list[str]]], aq: Mapping[str, nn.Module]
                      ) -> tuple[dict[str, tuple[tuple[int, int], tuple[int, int]]], set[int]]:
        """Quantized tensor -> the padding its quantizer takes over from the one Conv that reads its pair's
        output (see the module docstring), and the indices of those Conv nodes."""
        pads, convs = {}, set()
        for src, dq_outs in act_at.values():
            if len(dq_outs) != 1 or dq_outs[0] in self.output_names or not getattr(aq[src], "fuses_pad", False):
                continue
            users = readers.get(dq_outs[0], [])
            if len(users) != 1 or nodes[users[0]].op != "Conv" or nodes[users[0]].inputs[0].name != dq_outs[0]:
                continue
            pad = _asymmetric_pads(nodes[users[0]])
            if pad is not None:
                pads[src] = pad
                convs.add(users[0])
        return pads, convs

    def _liveness(self, steps: list[_Step]) -> list[_Step]:
        available = set(self.input_names)
        last_use: dict[str, int] = {}
        for i, step in enumerate(steps):
            for ref in step.inputs:
                if ref is None or ref[0] != "env":
                    continue
                if ref[1] not in available:
                    raise ValueError(f"node {step.name!r}: input {ref[1]!r} is neither a block input, a "
                                     "constant nor produced by an earlier node of the block")
                last_use[ref[1]] = i
            available.update(o for o in step.outputs if o)
        missing = [o for o in self.output_names if o not in available]
        if missing:
            raise ValueError(f"block outputs {missing} are not produced by the block")
        keep = set(self.output_names)
        dead: dict[int, list[str]] = {}
        for name, i in last_use.items():
            if name not in keep:
                dead.setdefault(i, []).append(name)
        return [replace(s, free=tuple(dead.get(i, ()))) for i, s in enumerate(steps)]

    @property
    def plan(self) -> list[tuple[str, str, str]]:
        """(kind, node name, op type) per executed step; kind is "op", "weight" (a weight
        quantizer replaces the DQ) or "act" (an activation quantizer replaces the Q/DQ pair)."""
        return [(s.kind, s.name, s.op) for s in self._steps]

    # ------------------------------------------------------------------ execution

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"BlockModule takes {len(self.input_names)} inputs {self.input_names}, "
                             f"got {len(inputs)}")
        env: dict[str, Tensor] = dict(zip(self.input_names, inputs))
        for step in self._steps:
            if step.kind == "weight":
                results = [self.weight_quantizers[step.quantizer]()]
            elif step.kind == "act":
                quantizer = self.act_quantizers[step.quantizer]
                x = env[step.inputs[0][1]]
                if step.clip is None and step.pad is None:
                    y = quantizer(x)
                else:
                    y = quantizer(x, clip=step.clip, pad=step.pad)
                results = [y] * len(step.outputs)
            else:
                args = [None if r is None else env[r[1]] if r[0] == "env" else self._buffers[r[1]]
                        for r in step.inputs]
                try:
                    results = step.fn(step.attrs, args)
                except Exception as exc:
                    raise RuntimeError(f"node {step.name!r} failed in torch: {exc}") from exc
            for name, value in zip(step.outputs, results):
                if name:
                    env[name] = value
            for name in step.free:
                env.pop(name, None)
        return tuple(env[name] for name in self.output_names)

    def extra_repr(self) -> str:
        kinds = [s.kind for s in self._steps]
        return (f"inputs={self.input_names}, outputs={self.output_names}, steps={len(kinds)} "
                f"(weight quantizers {kinds.count('weight')}, activation quantizers {kinds.count('act')})")


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """A float Clip's (lo, hi) when both are constant scalars (inputs, or attributes before opset 11)."""
    bounds = []
    for k, attr in ((1, "min"), (2, "max")):
        t = node.inputs[k] if len(node.inputs) > k else None
        if t is not None and t.name:
            if not isinstance(t, gs.Constant) or np.asarray(t.values).size != 1:
                return None
            value = np.asarray(t.values)
            if value.dtype.kind != "f":
                return None
            bounds.append(float(value.reshape(-1)[0]))
        elif attr in node.attrs:
            bounds.append(float(node.attrs[attr]))
        else:
            return None
    lo, hi = bounds
    return (lo, hi) if lo <= hi else None


def _asymmetric_pads(node: gs.Node) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A 2-D Conv's explicit ``((top, bottom), (left, right))`` pads when they differ at the two ends of an
    axis (symmetric ones cost the convolution nothing), else None."""
    if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = [int(p) for p in node.attrs.get("pads", [])]
    if len(pads) != 4 or min(pads) < 0 or (pads[0] == pads[2] and pads[1] == pads[3]):
        return None
    return (pads[0], pads[2]), (pads[1], pads[3])


def _block_nodes(graph: gs.Graph, inputs: Sequence[str], outputs: Sequence[str]) -> list[gs.Node]:
    """The nodes needed to compute ``outputs`` from ``inputs`` (and constants), in graph order."""
    tensors = graph.tensors()
    stop = set(inputs)
    needed: set[int] = set()
    stack = []
    for name in outputs:
        if name not in tensors:
            raise ValueError(f"block output {name!r} is not a tensor of the model")
        stack.append(tensors[name])
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t.name in seen or t.name in stop or isinstance(t, gs.Constant) or not t.name:
            continue
        seen.add(t.name)
        if not t.inputs:
            raise ValueError(f"tensor {t.name!r} is needed but is neither a block input nor computed")
        node = t.inputs[0]
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.inputs)
    return [n for n in graph.nodes if id(n) in needed]


def block_from_model(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str], *,
                     weight_quantizers: Mapping[str, nn.Module] | None = None,
                     act_quantizers: Mapping[str, nn.Module] | None = None) -> BlockModule:
    """BlockModule of the nodes of ``model`` between the tensors ``inputs`` and ``outputs``."""
    graph = gs.import_onnx(model)
    graph.toposort()
    return BlockModule(_block_nodes(graph, inputs, outputs), inputs, outputs,
                       weight_quantizers=weight_quantizers, act_quantizers=act_quantizers)
