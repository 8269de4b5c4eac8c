"""Which activation quantizers of a QDQ EfficientNet-Lite0 hold its error: leave one float at a time.

For every activation quantizer (``Q -> [Clip on codes]* -> DQ`` on a tensor that is not a constant) the
script rewires the DQ readers to the unrounded tensor and measures how much of the logits' mean squared
error to FP32 that removes, on the first N validation images at ``ORT_DISABLE_ALL`` (the QDQ graph itself).
Where the export moved a ReLU6 onto the codes (``*Clip_on_codes``) the float path keeps a ReLU6. It also
reports every quantizer float at once (after reconstruction that can *raise* the error: the learned weights
compensate the grids) and, with ``--channel-ranges``, how unequal each quantized tensor's channels are in
the float model on the calibration images (tensor range / median channel range: what a per-tensor grid
wastes on narrow channels; tensor range / RMS: how heavy its tails are).

Usage::

    python scripts/activation_sensitivity.py MODEL.onnx [--images 64] [--top 30] [--channel-ranges]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_sample import load_split  # noqa: E402
from logit_error import FP32, qdq_logit_mse, run  # noqa: E402

RELU6 = (0.0, 6.0)  # EfficientNet-Lite0's activation


@dataclass(frozen=True)
class Quantizer:
    source: str                # the quantized float tensor
    readers: frozenset[str]    # the DQ outputs that stand for it
    tag: str                   # "z<zero-point>", "c<clips on the codes>", "relu6" where one moved there
    relu6_on_codes: bool


def quantizers(model: onnx.ModelProto) -> list[Quantizer]:
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        frontier, dqs, clips, relu6 = [q.output[0]], [], 0, False
        while frontier:
            for user in consumers.get(frontier.pop(), []):
                if user.op_type == "Clip":
                    clips, relu6 = clips + 1, relu6 or "on_codes" in user.name
                    frontier.append(user.output[0])
                elif user.op_type == "DequantizeLinear":
                    dqs.append(user.output[0])
        if not dqs:
            continue
        has_zp = len(q.input) > 2 and q.input[2] in inits
        zp = int(numpy_helper.to_array(inits[q.input[2]]).reshape(-1)[0]) if has_zp else 0
        tag = f"z{zp} c{clips}" + (" relu6" if relu6 else "")
        found.append(Quantizer(q.input[0], frozenset(dqs), tag, relu6))
    return found


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        for node in pending:
            if node not in rest:
                ordered.append(node)
                ready.update(node.output)
        if len(rest) == len(pending):
            raise RuntimeError("the rewired graph has a cycle")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def floated(model: onnx.ModelProto, chosen: list[Quantizer]) -> onnx.ModelProto:
    """A copy of ``model`` whose readers of ``chosen`` quantizers read the float tensor (through a ReLU6
    where the export had moved one onto the codes)."""
    m = copy.deepcopy(model)
    extra = []
    for qz in chosen:
        new = qz.source
        if qz.relu6_on_codes:
            new = qz.source + "__relu6"
            extra.append(helper.make_node("Clip", [qz.source, "__relu6_lo", "__relu6_hi"], [new]))
        for node in m.graph.node:
            for k, name in enumerate(node.input):
                if name in qz.readers:
                    node.input[k] = new
    if extra:
        m.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), n)
                                    for v, n in zip(RELU6, ("__relu6_lo", "__relu6_hi"), strict=True)])
        m.graph.node.extend(extra)
        m = _toposort(m)
    return m


def channel_ranges(found: list[Quantizer], x: np.ndarray) -> dict[str, tuple[float, float]]:
    """(tensor range / median per-channel range, tensor range / RMS) of each quantized tensor of the float
    model on ``x``, after the ReLU6 where the export moved one onto the codes (the values the grid holds)."""
    fp = onnx.load(FP32)
    known = {o for n in fp.graph.node for o in n.output}
    chosen = [q for q in found if q.source in known]
    fp.graph.output.extend([helper.make_tensor_value_info(q.source, onnx.TensorProto.FLOAT, None) for q in chosen])
    values = run(fp, x, level="disable", outputs=[q.source for q in chosen])
    out = {}
    for q, v in zip(chosen, values, strict=True):
        name = q.source
        if q.relu6_on_codes:
            v = np.clip(v, *RELU6)
        axes = tuple(a for a in range(v.ndim) if a != 1)
        per_channel = v.max(axis=axes) - v.min(axis=axes)
        span = float(v.max() - v.min())
        out[name] = (span / max(float(np.median(per_channel)), 1e-12), span / max(float(np.sqrt(np.mean(v**2))), 1e-12))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--images", type=int, default=64, help="validation images scored")
    ap.add_argument("--top", type=int, default=30, help="quantizers listed")
    ap.add_argument("--channel-ranges", action="store_true", help="also the float model's channel ranges")
    args = ap.parse_args()
    if not args.model.is_file() or not FP32.is_file():
        sys.exit(f"activation_sensitivity: need {args.model} and {FP32} (scripts/export_efficientnet.py)")
    x, _ = load_split("val", limit=args.images)
    model = onnx.load(args.model)
    reference = run(FP32, x, level="disable")[0]

    def error(m: onnx.ModelProto) -> float:
        return qdq_logit_mse(m, x, reference)

    base = error(model)
    found = quantizers(model)
    print(f"{args.model}: {len(found)} activation quantizers, logit MSE to FP32 {base:.4f} on {len(x)} val images")
    print(f"every activation quantizer float: {error(floated(model, found)):.4f}")
    gains = sorted(((base - error(floated(model, [q])), q) for q in found), key=lambda g: -g[0])
    ratios = channel_ranges(found, load_split("calib", limit=32)[0]) if args.channel_ranges else {}
    print("MSE removed  quantizer" + ("  (tensor / median channel range, tensor range / RMS)" if ratios else ""))
    for gain, q in gains[:args.top]:
        ratio = f"  ({ratios[q.source][0]:.1f}, {ratios[q.source][1]:.1f})" if q.source in ratios else ""
        print(f"{gain:10.4f}   {q.tag:16s} {q.source}{ratio}")
    print(f"sum over single quantizers: {sum(g for g, _ in gains):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
