"""A model over protobuf's 2 GB limit through ``onnxq quantize``: time and peak memory.

Builds an MLP of ``--layers`` Gemm layers of ``--width`` x ``--width`` float32 weights (8 x 8448 is
2.28 GB) with its weights in an external data file written piece by piece (the whole model is never
in memory here), quantizes it to W8A8 (round to nearest) with the command line in a child process,
and reports the wall time, the child's peak resident memory (as a multiple of the model's size) and
whether the output loads and runs in onnxruntime. ``--in-file`` rewrites the model as one .onnx file
(weights inside it; under protobuf's 2 GB limit, e.g. ``--width 6144``: 1.1 GiB).

Usage::

    python scripts/bench_large_model.py [--dir build/large] [--layers 8] [--width 8448] [--in-file] [--keep]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

REPO_ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, layers: int, width: int, seed: int = 0) -> tuple[Path, int]:
    """Write ``folder/large.onnx`` and ``large.onnx.data``; returns the model path and its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = folder / "large.onnx.data"
    inits, nodes, prev, offset = [], [], "x", 0
    with open(data, "wb") as fh:
        for i in range(layers):
            for start in range(0, width, 512):  # 512 rows at a time: a few MB in memory
                rows = min(512, width - start)
                block = rng.standard_normal((rows, width), dtype=np.float32) * np.float32(width ** -0.5)
                fh.write(block.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(4 * width * width))):
                t.external_data.add(key=key, value=value)
            offset += 4 * width * width
            inits.append(t)
            nodes += [h.make_node("Gemm", [prev, f"W{i}"], [f"g{i}"], name=f"fc{i}"),
                      h.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"relu{i}")]
            prev = f"r{i}"
    graph = h.make_graph(nodes, "large_mlp", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                         [h.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", width])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "large.onnx"
    onnx.save_model(model, path)  # the weights are already external: this file is a few KB
    np.savez(folder / "calib.npz", x=rng.standard_normal((64, width), dtype=np.float32))
    return path, offset + path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=REPO_ROOT / "build" / "large")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=8448)
    ap.add_argument("--in-file", action="store_true", help="weights inside the .onnx file (under 2 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the folder (default: delete it)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, size = build(args.dir, args.layers, args.width)
    if args.in_file:  # in a child: this process must stay small, as a forked child starts with its memory
        subprocess.run([sys.executable, "-c", "import onnx, sys; onnx.save_model(onnx.load(sys.argv[1]), sys.argv[1])",
                        str(model)], check=True)
        model.with_name(model.name + ".data").unlink()
        size = model.stat().st_size
    print(f"built {model} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    out = args.dir / "out" / "large_w8a8.onnx"
    cmd = [sys.executable, "-m", "onnxq", "quantize", str(model), "-o", str(out), "--calib",
           str(args.dir / "calib.npz"), "--method", "rtn", "--batch-size", "8"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"onnxq quantize: exit {proc.returncode} in {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB "
          f"= {peak / size:.2f} x the model", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.ones((1, args.width), np.float32)})[0]
        written = sum(p.stat().st_size for p in out.parent.iterdir())
        print(f"output runs in onnxruntime: {y.shape}, {written / 2**30:.2f} GiB on disk")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
