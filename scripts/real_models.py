"""Real-model fixtures: PP-OCR (det, cls, rec) from ``rapidocr-onnxruntime`` and nudenet's YOLOv8n.

Importable helpers: model paths, :func:`describe` (opset, symbolic dims, op histogram, graph features a
quantizer must handle), and seeded, preprocessed feeds :func:`make_feeds` ({input: float32 NCHW, batch 1}).

Preprocessing follows the packages' own code (``rapidocr_onnxruntime`` 1.4.x, ``nudenet`` 3.4.x):

* det: image (BGR) resized so that its short side is ``limit_side_len`` (736, ``limit_type: min``), each side
  rounded to a multiple of 32, then ``x' = (x / 255 - 0.5) / 0.5`` and HWC -> NCHW.
* cls: crop resized to height 48, width ``min(ceil(48 * w / h), 192)``, same normalisation, zero padded
  (in normalised space) on the right up to 192.
* rec: as cls with height 48 and a fixed width of 320 (``max_wh_ratio = 320 / 48``; lines are kept short
  enough to fit, as rapidocr would only widen the batch for longer lines).
* yolov8n: BGR image zero padded at the bottom/right to a square, resized to 320x320 (bilinear), ``/255``,
  channels reordered by nudenet's ``cvtColor(RGBA2BGR)`` + ``blobFromImage(swapRB=True)`` pair (net effect:
  BGR order), NCHW.

``python scripts/real_models.py --describe`` prints the model descriptions; ``--selfcheck`` compares this
module's preprocessing with the packages' own functions.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
MODEL_KEYS = ("det", "cls", "rec", "yolov8n")
DET_PAGE_SIZE = (640, 640)  # rendered page (h, w); rapidocr's resize rule turns it into 736x736
DET_LIMIT_SIDE_LEN = 736
CLS_SHAPE = (3, 48, 192)
REC_SHAPE = (3, 48, 320)
YOLO_SIZE = 320
_SHAPE_LOGIC_OPS = {"Shape", "Gather", "Range", "ConstantOfShape", "Expand", "Unsqueeze", "Squeeze",
                    "Slice", "Cast", "Reshape", "Size", "NonZero", "Where", "Equal"}
_WORDS = ("invoice", "total", "date", "amount", "order", "price", "qty", "item", "name", "address", "phone",
          "receipt", "number", "account", "balance", "payment", "customer", "street", "city", "tax", "cash",
          "OCR", "ONNX", "Model", "Report", "Section", "Table", "Figure", "Summary", "page", "the", "and",
          "of", "for", "with", "from", "data", "value", "quality", "result", "shipping", "discount")


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"package {package!r} is not installed: pip install {pip_name}")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def ppocr_model_paths() -> dict[str, Path]:
    """Default det/cls/rec ONNX files of the installed rapidocr_onnxruntime, as named in its config.yaml."""
    import yaml  # dependency of rapidocr_onnxruntime

    cfg = yaml.safe_load(_package_file("rapidocr_onnxruntime", "config.yaml").read_text(encoding="utf-8"))
    return {key: _package_file("rapidocr_onnxruntime", cfg[section]["model_path"])
            for key, section in (("det", "Det"), ("cls", "Cls"), ("rec", "Rec"))}


def yolov8n_path() -> Path:
    """nudenet's YOLOv8n detector (320x320, 18 classes)."""
    return _package_file("nudenet", "320n.onnx")


def model_path(key: str) -> Path:
    """Path of one of :data:`MODEL_KEYS`."""
    if key == "yolov8n":
        return yolov8n_path()
    if key not in MODEL_KEYS:
        raise ValueError(f"unknown model key {key!r}; use one of {MODEL_KEYS}")
    return ppocr_model_paths()[key]


def data_root() -> Path:
    """Shared data folder: ``$ONNXQ_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("ONNXQ_DATA", REPO.parent / "shared" / "data"))


@functools.lru_cache(maxsize=None)
def input_name(key: str) -> str:
    model = onnx.load(str(model_path(key)), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits][0]


# ----------------------------------------------------------------------------------------- describe

def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    # Paddle exports write dynamic dims as dim_value -1: report them as symbolic too.
    return [(d.dim_value if d.dim_value >= 0 else f"{d.dim_value} (negative dim_value)")
            if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _const_scalar(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                  ) -> float | None:
    tensor = inits.get(name)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    if tensor is None:
        return None
    arr = onnx.numpy_helper.to_array(tensor)
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _count_patterns(graph: onnx.GraphProto) -> dict[str, int]:
    """Count activation/normalisation spellings a quantizer must recognise as one unit.

    HardSwish ``x*Clip(x+3,0,6)/6``; ``x*HardSigmoid(x)``; squeeze-excitation gates ``y*HardSigmoid(z)``;
    SiLU ``x*Sigmoid(x)``; Swish ``x*Sigmoid(b*x)``; LayerNorm spelt ``(x-m)/Sqrt(ReduceMean((x-m)^2)+eps)``.
    """
    prod = {o: n for n in graph.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            cons.setdefault(name, []).append(node)
    inits = {t.name: t for t in graph.initializer}

    def op(name: str) -> str | None:
        return prod[name].op_type if name in prod else None

    def const(name: str) -> bool:
        return _const_scalar(name, prod, inits) is not None

    found: Counter[str] = Counter()
    for node in graph.node:
        users = cons.get(node.output[0], [])
        if node.op_type == "HardSigmoid":
            for mul in (u for u in users if u.op_type == "Mul"):
                found["x*HardSigmoid(x)" if node.input[0] in mul.input else "SE gate y*HardSigmoid(z)"] += 1
        elif node.op_type == "Sigmoid":
            src, key, xs = prod.get(node.input[0]), "SiLU x*Sigmoid(x)", [node.input[0]]
            if src is not None and src.op_type == "Mul" and const(src.input[1]):
                xs, key = [src.input[0], node.input[0]], "Swish x*Sigmoid(b*x)"
            found[key] += sum(u.op_type == "Mul" and any(x in u.input for x in xs) for u in users)
        elif node.op_type == "Sqrt" and op(node.input[0]) == "Add":
            mean = prod[node.input[0]].input[0]
            if op(mean) == "ReduceMean" and op(prod[mean].input[0]) == "Pow":
                found["LayerNorm decomposed (ReduceMean/Sub/Pow/Sqrt/Div)"] += 1
        elif node.op_type == "Clip" and op(node.input[0]) == "Add":
            xs = [i for i in prod[node.input[0]].input if not const(i)]
            for mul in (u for u in users if len(xs) == 1 and u.op_type == "Mul" and xs[0] in u.input):
                after = cons.get(mul.output[0], [])
                if any(a.op_type in ("Div", "Mul") and const(a.input[1]) for a in after):
                    found["x*Clip(x+3,0,6)/6"] += 1
    return {k: v for k, v in found.items() if v}


def describe(path: str | Path) -> dict[str, Any]:
    """Summarise an ONNX model for quantization planning (JSON-able)."""
    model = onnx.load(str(path))
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    inits = {t.name for t in graph.initializer}
    inputs = [{"name": i.name, "dims": _dims(i)} for i in graph.input if i.name not in inits]
    outputs = [{"name": o.name, "dims": _dims(o)} for o in graph.output]
    const_params = sum(int(np.prod(a.t.dims)) for n in graph.node if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value")
    init_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    dynamic = {v["name"]: [d for d in v["dims"] if isinstance(d, str)] for v in inputs + outputs}
    notes = []
    if ops.get("Constant"):
        notes.append(f"{ops['Constant']} Constant nodes hold {const_params} values "
                     f"(initializers hold {init_params}): weights must be read from Constant nodes")
    if ops.get("BatchNormalization"):
        notes.append(f"{ops['BatchNormalization']} unfused BatchNormalization")
    patterns = _count_patterns(graph)
    if patterns:
        notes.append("patterns: " + ", ".join(f"{k} x{v}" for k, v in patterns.items()))
    if any(dynamic.values()):
        notes.append("dynamic dims: " + "; ".join(f"{k}={v}" for k, v in dynamic.items() if v))
    logic = {k: ops[k] for k in sorted(_SHAPE_LOGIC_OPS) if ops.get(k)}
    if logic:
        notes.append("shape logic ops: " + ", ".join(f"{k} x{v}" for k, v in logic.items()))
    return {
        "path": str(path),
        "file_mb": round(Path(path).stat().st_size / 2**20, 2),
        "ir_version": model.ir_version,
        "opset": {d.domain or "ai.onnx": d.version for d in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": inputs,
        "outputs": outputs,
        "nodes": len(graph.node),
        "params": const_params + init_params,
        "op_histogram": dict(ops.most_common()),
        "patterns": patterns,
        "notes": notes,
    }


def format_description(desc: dict[str, Any]) -> str:
    lines = [f"{desc['path']}  ({desc['file_mb']} MB, IR {desc['ir_version']}, opset {desc['opset']}, "
             f"producer '{desc['producer']}', {desc['nodes']} nodes, {desc['params']:,} params)"]
    lines += [f"  input  {v['name']}: {v['dims']}" for v in desc["inputs"]]
    lines += [f"  output {v['name']}: {v['dims']}" for v in desc["outputs"]]
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in desc["op_histogram"].items()))
    lines += [f"  - {n}" for n in desc["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- rendering

def _random_token(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 6)
    if kind <= 2:
        word = str(rng.choice(_WORDS))
        return word.capitalize() if rng.random() < 0.3 else word.upper() if rng.random() < 0.1 else word
    if kind == 3:
        return str(rng.integers(0, 10 ** int(rng.integers(1, 7))))
    if kind == 4:
        return f"{rng.integers(1, 999)}.{rng.integers(0, 100):02d}" + ("$" if rng.random() < 0.3 else "")
    return f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"


def _text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(_random_token(rng) for _ in range(n_words))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(185, 250, size=3)
    ramp = np.linspace(0, rng.uniform(-25, 10), w)[None, :, None]
    img = base[None, None, :] + ramp + rng.normal(0, rng.uniform(2, 10), size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.7:
        g = int(rng.integers(0, 70))
        return (g, g, g)
    return tuple(int(c) for c in rng.integers(0, 110, size=3))


def render_page(rng: np.random.Generator, size: tuple[int, int] = DET_PAGE_SIZE) -> np.ndarray:
    """A synthetic document page (BGR uint8): text lines of mixed sizes, rules and a box on a noisy bg."""
    h, w = size
    img = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # rules and table lines
        y = int(rng.integers(0, h))
        draw.line([(int(rng.integers(0, w // 3)), y), (int(rng.integers(2 * w // 3, w)), y)],
                  fill=tuple(int(c) for c in rng.integers(60, 180, size=3)), width=int(rng.integers(1, 3)))
    if rng.random() < 0.5:
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.rectangle([x0, y0, x0 + int(rng.integers(80, w // 2)), y0 + int(rng.integers(40, h // 3))],
                       outline=_ink(rng), width=2)
    y = int(rng.integers(5, 30))
    while y < h - 20:
        size_px = int(rng.choice([12, 16, 20, 24, 32, 40]))
        font = ImageFont.load_default(size=size_px)
        x = int(rng.integers(5, w // 4))
        while x < w - 40:
            text = _text(rng, int(rng.integers(1, 5)))
            draw.text((x, y), text, font=font, fill=_ink(rng))
            x += int(draw.textlength(text, font=font)) + int(rng.integers(20, 120))
            if rng.random() < 0.4:
                break
        y += int(size_px * rng.uniform(1.3, 2.6))
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def render_line(rng: np.random.Generator, text: str, size_px: int) -> np.ndarray:
    """One tightly cropped text line (BGR uint8), like a detector crop: a few pixels of margin."""
    font = ImageFont.load_default(size=size_px)
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(2, 8)), int(rng.integers(2, 7))
    w, h = right - left + 2 * mx, bottom - top + 2 * my
    img = Image.fromarray(_background(rng, h, w))
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=_ink(rng))
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


# ----------------------------------------------------------------------------------------- preprocessing

def det_preprocess(img: np.ndarray, limit_side_len: int = DET_LIMIT_SIDE_LEN) -> np.ndarray:
    """rapidocr DetPreProcess with ``limit_type="min"``; returns (1, 3, H, W) float32."""
    h, w = img.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh = int(round(int(h * ratio) / 32) * 32)
    rw = int(round(int(w * ratio) / 32) * 32)
    x = cv2.resize(img, (rw, rh)).astype(np.float32) * (1 / 255.0)
    x = (x - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def line_preprocess(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """rapidocr cls/rec resize_norm_img; returns (1, 3, H, W) float32, zero padded on the right."""
    c, th, tw = shape
    h, w = img.shape[:2]
    rw = min(tw, int(math.ceil(th * w / float(h))))
    x = cv2.resize(img, (rw, th)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((c, th, tw), dtype=np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out[None]


def yolo_preprocess(path: str | Path, size: int = YOLO_SIZE) -> np.ndarray:
    """nudenet ``_read_image``: pad bottom/right to square, resize, /255, BGR NCHW (1, 3, size, size)."""
    mat = cv2.imread(str(path))
    if mat is None:
        raise FileNotFoundError(f"cannot read image {path}")
    side = max(mat.shape[:2])
    mat = cv2.copyMakeBorder(mat, 0, side - mat.shape[0], 0, side - mat.shape[1], cv2.BORDER_CONSTANT)
    x = cv2.resize(mat, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    return x.transpose(2, 0, 1)[None].astype(np.float32)


# ----------------------------------------------------------------------------------------- feeds

def imagenet_split(split: str) -> list[Path]:
    """Image files of the shared ImageNet sample: calib = class_index % 4 == 0, eval = the rest."""
    folder = data_root() / "imagenet-sample"
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"shared data missing: {labels} (set ONNXQ_DATA)")
    with labels.open(newline="") as f:
        rows = list(csv.DictReader(f))
    want_calib = split == "calib"
    return [folder / r["file"] for r in rows if (int(r["class_index"]) % 4 == 0) == want_calib]


def make_samples(model_key: str, n: int, seed: int = 0, split: str = "calib"
                 ) -> tuple[list[dict[str, np.ndarray]], list[Any]]:
    """Feeds plus per-sample metadata (det: None; cls: 0/1 = upright/180; rec: the text; yolo: file)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    name = input_name(model_key)
    rng = np.random.default_rng([seed, MODEL_KEYS.index(model_key), split == "eval"])
    feeds: list[dict[str, np.ndarray]] = []
    meta: list[Any] = []
    if model_key == "yolov8n":
        files = imagenet_split(split)
        if n > len(files):
            raise ValueError(f"{n} images requested, split {split!r} has {len(files)}")
        for i in sorted(rng.permutation(len(files))[:n]):
            feeds.append({name: yolo_preprocess(files[i])})
            meta.append(files[i].name)
        return feeds, meta
    for _ in range(n):
        if model_key == "det":
            feeds.append({name: det_preprocess(render_page(rng))})
            meta.append(None)
            continue
        size_px = int(rng.choice([16, 20, 24, 28, 32, 40]))
        limit = CLS_SHAPE[2] / CLS_SHAPE[1] if model_key == "cls" else REC_SHAPE[2] / REC_SHAPE[1]
        for n_words in range(int(rng.integers(1, 5)), 0, -1):
            text = _text(rng, n_words)
            line = render_line(rng, text, size_px)
            if line.shape[1] / line.shape[0] <= limit or model_key == "cls":
                break
        if model_key == "rec":
            while line.shape[1] / line.shape[0] > limit:  # a single long token: shorten it
                text = text[:-1].rstrip()
                line = render_line(rng, text, size_px)
            feeds.append({name: line_preprocess(line, REC_SHAPE)})
            meta.append(text)
        else:
            flip = int(rng.random() < 0.5)
            line = cv2.rotate(line, cv2.ROTATE_180) if flip else line
            feeds.append({name: line_preprocess(line, CLS_SHAPE)})
            meta.append(flip)
    return feeds, meta


def make_feeds(model_key: str, n: int, seed: int = 0, split: str = "calib") -> list[dict[str, np.ndarray]]:
    """``n`` preprocessed batch-1 feeds for ``model_key``; deterministic in (model_key, n, seed, split)."""
    return make_samples(model_key, n, seed, split)[0]


def rec_characters() -> list[str]:
    """CTC alphabet of the rec model (metadata 'character'), with rapidocr's blank (0) and trailing space."""
    model = onnx.load(str(model_path("rec")), load_external_data=False)
    chars = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    return ["blank", *chars, " "]


def ctc_greedy_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop blank (index 0). ``probs``: (N, T, C)."""
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(chars[i] for i in idx[keep]))
    return out


# ----------------------------------------------------------------------------------------- CLI

def _selfcheck() -> None:
    """Compare this module's preprocessing with the packages' own functions on rendered inputs."""
    from types import SimpleNamespace

    from nudenet.nudenet import _read_image
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    rng = np.random.default_rng(0)
    page = render_page(rng, (500, 620))
    ref = DetPreProcess(DET_LIMIT_SIDE_LEN, "min", [0.5] * 3, [0.5] * 3)(page)
    print("det ", ref.shape, float(np.abs(ref - det_preprocess(page)).max()))
    line = render_line(rng, "Total 12.50$", 24)
    ref = TextClassifier.resize_norm_img(SimpleNamespace(cls_image_shape=list(CLS_SHAPE)), line)[None]
    print("cls ", ref.shape, float(np.abs(ref - line_preprocess(line, CLS_SHAPE)).max()))
    ref = TextRecognizer.resize_norm_img(SimpleNamespace(rec_image_shape=list(REC_SHAPE)), line,
                                         REC_SHAPE[2] / REC_SHAPE[1])[None]
    print("rec ", ref.shape, float(np.abs(ref - line_preprocess(line, REC_SHAPE)).max()))
    img = imagenet_split("eval")[0]
    ref = _read_image(str(img), YOLO_SIZE)[0]
    print("yolo", ref.shape, float(np.abs(ref - yolo_preprocess(img)).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--describe", action="store_true", help="print model descriptions")
    parser.add_argument("--selfcheck", action="store_true", help="compare preprocessing with the packages")
    args = parser.parse_args()
    if args.describe:
        for key in MODEL_KEYS:
            print(f"[{key}] " + format_description(describe(model_path(key))) + "\n")
    if args.selfcheck:
        _selfcheck()


if __name__ == "__main__":
    main()
