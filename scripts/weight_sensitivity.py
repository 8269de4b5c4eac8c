"""Which weighted layers of a QDQ EfficientNet-Lite0 hold its error: give one layer its float weights at a time.

The counterpart of ``activation_sensitivity.py`` for weights. For every Conv and Gemm of the quantized model
whose node name is also in FP32's graph (onnxq keeps the exporter's names; nothing is equalised unless
``float_phase.equalize`` is set), the script points the node's weight and bias at FP32's tensors (the
quantized model's own activation quantizers stay) and measures how much of the logits' mean squared error
to FP32 that removes, on the first N validation images at ``ORT_DISABLE_ALL`` (the QDQ graph itself). It
also reports every layer float at once (what the activation grids alone cost, with the weights the run
fitted to them gone) and the removals summed per block (``/_blocks.N/``), which is where a reconstruction
schedule can spend its iterations. A layer's removal can be negative: reconstruction fits each layer's
rounding to its neighbours' and to the activation grids, so one float layer among quantized ones can be
worse than its fitted codes.

Usage::

    python scripts/weight_sensitivity.py MODEL.onnx [--images 64] [--top 30]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_sample import load_split  # noqa: E402
from logit_error import FP32, qdq_logit_mse, run  # noqa: E402

WEIGHTED = ("Conv", "Gemm")
BLOCK = re.compile(r"^/_blocks\.(\d+)/")


def float_params(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per weighted node of ``quantized`` that FP32 also has: (input index, FP32's tensor) for its weight
    and bias where the shapes agree."""
    fp_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    fp_nodes = {n.name: n for n in fp32.graph.node if n.op_type in WEIGHTED}
    shapes = _shapes(quantized)
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for node in quantized.graph.node:
        twin = fp_nodes.get(node.name)
        if node.op_type not in WEIGHTED or twin is None:
            continue
        params = []
        for k in (1, 2):
            if k < len(node.input) and k < len(twin.input) and twin.input[k] in fp_inits:
                value = fp_inits[twin.input[k]]
                if shapes.get(node.input[k]) == value.shape:
                    params.append((k, value))
        if params:
            out[node.name] = params
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of the model's tensors (inferred ones and initializers), to match FP32's weights against."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[info.name] = tuple(d.dim_value for d in dims)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def floated(model: onnx.ModelProto, params: dict[str, list[tuple[int, np.ndarray]]],
            chosen: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``chosen`` nodes read FP32's weight and bias."""
    m = copy.deepcopy(model)
    nodes = {n.name: n for n in m.graph.node}
    for name in chosen:
        for k, value in params[name]:
            tensor = f"{name}__float_input{k}"
            m.graph.initializer.append(numpy_helper.from_array(value, tensor))
            nodes[name].input[k] = tensor
    return m


def block_of(name: str) -> str:
    match = BLOCK.match(name)
    return f"block {int(match.group(1)):2d}" if match else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--images", type=int, default=64, help="validation images scored")
    ap.add_argument("--top", type=int, default=30, help="layers listed")
    args = ap.parse_args()
    if not args.model.is_file() or not FP32.is_file():
        sys.exit(f"weight_sensitivity: need {args.model} and {FP32} (scripts/export_efficientnet.py)")
    x, _ = load_split("val", limit=args.images)
    model = onnx.load(args.model)
    params = float_params(model, onnx.load(FP32))
    if not params:
        sys.exit(f"weight_sensitivity: no Conv or Gemm of {args.model} has a twin of the same name and shape in {FP32}")
    reference = run(FP32, x, level="disable")[0]

    def error(m: onnx.ModelProto) -> float:
        return qdq_logit_mse(m, x, reference)

    base = error(model)
    print(f"{args.model}: {len(params)} weighted layers with FP32 twins, logit MSE to FP32 {base:.4f} "
          f"on {len(x)} val images")
    print(f"every layer's weights float: {error(floated(model, params, list(params))):.4f}")
    gains = sorted(((base - error(floated(model, params, [name])), name) for name in params), key=lambda g: -g[0])
    print("MSE removed  layer")
    for gain, name in gains[:args.top]:
        print(f"{gain:10.4f}   {name}")
    per_block: dict[str, float] = defaultdict(float)
    for gain, name in gains:
        per_block[block_of(name)] += gain
    print("MSE removed, summed per block")
    for block, gain in sorted(per_block.items(), key=lambda kv: -kv[1]):
        print(f"{gain:10.4f}   {block}")
    print(f"sum over single layers: {sum(g for g, _ in gains):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
