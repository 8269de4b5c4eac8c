"""onnxruntime CPU sessions and feeds for the validator: a model from a path or a ModelProto, sessions
that turn a failure into an error line, the graph onnxruntime really runs, and feed checks."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from onnxq.core import mapped, memory
from onnxq.core.graph import PROTO_LIMIT, proto_size, serialize_for_ort
from onnxq.errors import UserError
from onnxq.report.metrics import count_ops

ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@dataclass(frozen=True)
class Source:
    """A model given as a file path or as an in-memory ModelProto (serialized once for ORT)."""

    path: Path | None
    proto: onnx.ModelProto | None
    data: bytes | None
    config: Mapping[str, str] = dataclasses.field(default_factory=dict)  # session config entries (mapped weights)

    @staticmethod
    def of(model: str | Path | onnx.ModelProto, what: str) -> Source:
        if isinstance(model, onnx.ModelProto):
            if proto_size(model) >= PROTO_LIMIT:
                raise UserError(f"{what} is a ModelProto over protobuf's 2 GB limit: save it with "
                                "onnx.save(model, path, save_as_external_data=True) and pass the path")
            if any(uses_external_data(t) and not mapped.is_mapped(t) for t in model.graph.initializer):
                raise UserError(f"{what} references external data that is not loaded: pass the model's path, "
                                "or load it with onnx.load(path) (load_external_data=True)")
            data, config = serialize_for_ort(model)
            return Source(None, model, data, config)  # type: ignore[arg-type]
        if isinstance(model, (str, os.PathLike)):
            if not Path(model).is_file():
                raise UserError(f"{what} {str(model)!r} is not a file: pass the path of an .onnx model")
            return Source(Path(model), None, None)
        raise UserError(f"{what} must be a path or an onnx.ModelProto, got {type(model).__name__}")

    def ort_input(self) -> str | bytes:
        return str(self.path) if self.path is not None else self.data  # type: ignore[return-value]

    def load(self) -> onnx.ModelProto:
        return self.proto if self.proto is not None else onnx.load(str(self.path))


def short_error(exc: BaseException) -> str:
    """One line from an exception, without ORT's source location and C++ signature."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ", "", text)


def threads() -> int:
    """Intra-op threads: ``$ONNXQ_THREADS`` when set, else 0 (ORT's default)."""
    raw = os.environ.get("ONNXQ_THREADS", "").strip()
    if raw and not raw.isdigit():
        raise UserError(f"ONNXQ_THREADS={raw!r} is not a non-negative integer: set e.g. 4, or unset it")
    return int(raw) if raw else 0


def session_options(level: ort.GraphOptimizationLevel, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """CPU session options at ``level``: ``threads()`` intra-op threads, fatal logs only (failures reach the
    caller as exceptions), and the session ``config`` entries a model needs (:func:`serialize_for_ort`)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads()
    so.log_severity_level = 4
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def open_session(model: onnx.ModelProto | Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """An ORT CPU session over our own model (a ModelProto of any size: over 2 GB through a temporary
    file; mapped weights read from their file) or a file; a failure raises (use :func:`build_session` for
    a model that may be broken)."""
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), session_options(level), providers=["CPUExecutionProvider"])
    src, config = serialize_for_ort(model)
    return ort.InferenceSession(src, session_options(level, config), providers=["CPUExecutionProvider"])


def inputs_for(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``feed`` that are inputs of ``sess``."""
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def build_session(src: Source, level: ort.GraphOptimizationLevel,
                   save_dir: str | None = None) -> tuple[ort.InferenceSession | None, str | None]:
    """An ORT CPU session at ``level``, or None and the error line.

    With ``save_dir``, ORT saves its optimized graph to ``save_dir/optimized.onnx`` (initializers
    over 1 KiB go to an external file, so models of any size serialize).
    """
    memory.trim()  # the session's weights should find the pages freed before it
    so = session_options(level, src.config)
    if save_dir is not None:
        so.optimized_model_filepath = str(Path(save_dir) / "optimized.onnx")
        key = "session.optimized_model_external_initializers_"
        so.add_session_config_entry(key + "file_name", "optimized.data")
        so.add_session_config_entry(key + "min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(src.ort_input(), so, providers=["CPUExecutionProvider"]), None
    except Exception as exc:  # a broken model is a finding, never a crash
        return None, short_error(exc)


def saved_counts(save_dir: str) -> dict[str, int]:
    path = Path(save_dir) / "optimized.onnx"
    return count_ops(onnx.load(str(path), load_external_data=False).graph) if path.is_file() else {}


def optimized_op_counts(model: str | Path | onnx.ModelProto,
                        level: ort.GraphOptimizationLevel = ENABLE_ALL) -> dict[str, int]:
    """op_type -> count in the graph ORT CPU runs after optimizing ``model`` at ``level``.

    ORT writes its optimized graph (``SessionOptions.optimized_model_filepath``) into a temporary
    directory; ORT 1.31 needs no extra config for that (prepacking does not block it). Nodes of
    every domain (``com.microsoft`` fused kernels included) and of subgraphs are counted.

    Raises:
        RuntimeError: ORT could not build a session for the model.
    """
    src = Source.of(model, "model")
    with tempfile.TemporaryDirectory(prefix="onnxq-opt-") as tmp:
        sess, err = build_session(src, level, tmp)
        if sess is None:
            raise RuntimeError(f"onnxruntime could not build a CPU session: {err}")
        return saved_counts(tmp)


class Runner:
    """One ORT session that records one error line and stops at its first failure."""

    def __init__(self, label: str, src: Source, level: ort.GraphOptimizationLevel, errors: list[str],
                 save_dir: str | None = None) -> None:
        self.label, self.errors = label, errors
        self.sess, err = build_session(src, level, save_dir)
        if err is not None:
            errors.append(f"{label}: session build failed: {err}")
        self.ok = self.sess is not None
        self.names = [o.name for o in self.sess.get_outputs()] if self.sess is not None else []
        self.inputs = {i.name for i in self.sess.get_inputs()} if self.sess is not None else set()

    def run(self, feed: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray] | None:
        if not self.ok or self.sess is None:
            return None
        try:
            outs = self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        except Exception as exc:  # any failure inside ORT is a finding, not a crash
            self.errors.append(f"{self.label}: run failed on sample {i}: {short_error(exc)}")
            self.ok = False
            return None
        return {n: np.asarray(o) for n, o in zip(self.names, outs)}


_ORT_NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def collect_feeds(feeds: Iterable[Mapping[str, np.ndarray]],
                   max_samples: int | None) -> list[dict[str, np.ndarray]]:
    """Materialize at most ``max_samples`` feed dicts (the iterable is read once, no further)."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UserError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if isinstance(feeds, Mapping) or not isinstance(feeds, Iterable):
        raise UserError("feeds must be an iterable of dicts {input name: array}: wrap one feed as [feed]")
    out: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(itertools.islice(feeds, max_samples)):
        if not isinstance(feed, Mapping):
            raise UserError(f"feed {i} is a {type(feed).__name__}, not a dict {{input name: array}}")
        out.append({str(k): np.asarray(v) for k, v in feed.items()})
    if not out:
        raise UserError("feeds is empty: pass at least one dict {input name: array} with a batch dimension")
    return out


def check_feeds(feeds: list[dict[str, np.ndarray]], sess: ort.InferenceSession) -> None:
    """Every feed must provide each input of the (float) session, with its element type."""
    names = [x.name for x in sess.get_inputs()]
    for i, feed in enumerate(feeds):
        for inp in sess.get_inputs():
            if inp.name not in feed:
                raise UserError(f"feed {i} lacks input {inp.name!r} (model inputs: {names}): add it")
            want = _ORT_NP.get(inp.type)
            if want is not None and feed[inp.name].dtype != want:
                raise UserError(f"feed {i} input {inp.name!r} is {feed[inp.name].dtype} but the model wants "
                                f"{np.dtype(want)}: cast it with .astype(np.{np.dtype(want).name})")
