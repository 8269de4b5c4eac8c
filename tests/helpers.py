"""Shared test helpers: tiny models from ONNX text, onnxruntime runs, closeness checks, pass runs.

Import as ``from tests.helpers import make_model, run_ort, ...`` (pytest runs from the repo root).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort

from onnxq.config import Config, QuantConfig, Validation, as_config
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_graph, to_model
from onnxq.core.pass_infra import Pass
from onnxq.core.weight_cast import cast_source, folded_casts

#: Validation without fidelity floors, for tests of what a run writes rather than how well it does
#: (tiny random models at 2 or 4 bits land under the default floors).
NO_FLOORS = Validation(min_top1_agreement=0.0, min_cosine=-1.0)
NO_FLOOR_FLAGS = ["--set", "validation.min_top1_agreement=0", "--set", "validation.min_cosine=-1"]


def without_floors(config: Config | QuantConfig) -> Config:
    """``config`` (a legacy QuantConfig is converted) with :data:`NO_FLOORS`."""
    cfg = as_config(config)
    return cfg.replace(validation=replace(NO_FLOORS, enabled=cfg.validation.enabled))


def init_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The constant ``name`` of ``model``, read through the integer Cast that narrow weights go through
    (:mod:`onnxq.core.weight_cast`; the values are the same)."""
    source = cast_source(folded_casts(model.graph), name)
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == source)


def make_model(text: str, seed: int = 0, **inits: np.ndarray) -> onnx.ModelProto:
    """Parse an ONNX text model and attach initializers.

    ``inits`` maps tensor names to arrays; a name that is also declared as a graph input stops being
    one. Tensors declared in the ``<...>`` value-info section (``<float[4,3,3,3] w>``) that no node
    produces and ``inits`` does not give are filled with seeded random values: N(0, 1) for floats,
    except names containing ``var`` (BatchNormalization variances),, drawn from U(0.5, 1.5).
    Integer tensors must be given explicitly.

    Example::

        make_model('''
            <ir_version: 8, opset_import: ["" : 13]>
            g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w> {
                y = Conv <pads=[1,1,1,1]> (x, w)
            }''')
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    declared = {vi.name: vi for vi in graph.value_info if vi.name not in produced}
    arrays: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in inits.items()}
    for name, vi in declared.items():
        if name in arrays:
            continue
        ttype = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        shape = [d.dim_value for d in ttype.shape.dim]
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"declared tensor {name!r} is not float: give it, make_model({name}=...)")
        if "var" in name.lower():
            arrays[name] = rng.uniform(0.5, 1.5, size=shape).astype(dtype)
        else:
            arrays[name] = rng.standard_normal(shape).astype(dtype)
    keep_vi = [vi for vi in graph.value_info if vi.name not in arrays]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    keep_inputs = [vi for vi in graph.input if vi.name not in arrays]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    for name, arr in arrays.items():
        graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str = "all") -> list[np.ndarray]:
    """Run ``model`` on CPU; ``level`` is the graph optimization level: "all" or "disable"."""
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(None, feeds)]


def assert_close(a: np.ndarray | Sequence[np.ndarray], b: np.ndarray | Sequence[np.ndarray],
                 rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Assert two arrays (or two equally long lists of arrays) are equal in shape, close and NaN-free."""
    a_list = list(a) if isinstance(a, (list, tuple)) else [a]
    b_list = list(b) if isinstance(b, (list, tuple)) else [b]
    assert len(a_list) == len(b_list), f"{len(a_list)} arrays vs {len(b_list)}"
    for i, (x, y) in enumerate(zip(a_list, b_list)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, f"output {i}: shape {x.shape} vs {y.shape}"
        diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, equal_nan=False,
                                   err_msg=f"output {i}: max abs diff {diff:.3g}")


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2,
                 dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs: symbolic dims come from ``dims`` by name, else ``batch`` on axis 0, else 8."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ttype = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif dims and d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                shape.append(batch if axis == 0 else 8)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) > 0.5
        else:
            feeds[vi.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def make_context(config: Config | QuantConfig | None = None, **fields) -> QuantContext:
    """A QuantContext with ``config`` resolved against its target (and that target) as a run has it."""
    from onnxq.targets.profiles import get_target, resolve_config

    resolved = resolve_config(as_config(config))
    fields.setdefault("target", get_target(resolved.target))
    return QuantContext(config=resolved, **fields)


def prepare_float(model: onnx.ModelProto, config: Config | QuantConfig | None = None, calib=None):
    """The float reference and a fresh context, as a run makes them (:func:`onnxq.pipeline.build.prepare_float`)."""
    from onnxq.pipeline.build import prepare_float as prepare
    from onnxq.targets.profiles import resolve_config

    return prepare(model, resolve_config(as_config(config)), calib)


def run_pass(model: onnx.ModelProto, pass_: Pass,
             config: Config | QuantConfig | None = None) -> tuple[onnx.ModelProto, QuantContext]:
    """Import ``model`` to graphsurgeon, run ``pass_`` with a fresh QuantContext, export."""
    graph = to_graph(model)
    ctx = make_context(config)
    pass_(graph, ctx)
    out = to_model(graph, template=model)
    onnx.checker.check_model(out)
    return out, ctx


def op_types(model: onnx.ModelProto) -> list[str]:
    """The op types of the top-level graph, in order."""
    return [n.op_type for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer ``name``."""
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    raise KeyError(name)


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: torch on one thread with oneDNN off for the
    module, then restored. Tiny layers gain nothing from threads and oneDNN, only per-call overhead
    (much slower on a busy 2-core box); module scope, so shared module fixtures see it too.

    Use: ``_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)``.
    """
    import torch

    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn


def recon_config(config: Config | QuantConfig):
    """The engine record a run of ``config`` reconstructs with (its rounding method resolved)."""
    from onnxq.blocks.engine_settings import recon_settings
    from onnxq.targets.profiles import resolve_config

    c = resolve_config(as_config(config))
    return recon_settings(c.rounding, activation_bits=c.activations.bits, seed=c.seed, device=c.engine.device)


def adaquant_config(config: Config | QuantConfig):
    """The engine record of a run's AdaQuant."""
    from onnxq.blocks.engine_settings import adaquant_settings
    from onnxq.targets.profiles import resolve_config

    c = resolve_config(as_config(config))
    return adaquant_settings(c.rounding, seed=c.seed, device=c.engine.device)


def mrecg_iters(config: Config | QuantConfig) -> str:
    """A run's resolved MRECG iteration mode."""
    from onnxq.targets.profiles import resolve_config

    return resolve_config(as_config(config)).rounding.mrecg.iters


def engine_config(method: str, schedule: str = "paper", *, seed: int = 0, device: str = "cpu", holdout: int = 0,
                  activation_bits: int = 8, **fields):
    """An engine record for ``method`` on ``schedule`` with ``fields`` overridden (fields a method does not
    have, e.g. act_iters for qdrop, are left out), as :func:`onnxq.blocks.engine_settings.recon_settings`
    builds it."""
    import dataclasses

    from onnxq.blocks.engine_settings import recon_settings
    from onnxq.config.rounding import ROUNDING_TYPES, RoundToNearest

    kind = ROUNDING_TYPES[method]
    if kind is RoundToNearest:
        return dataclasses.replace(recon_settings(RoundToNearest(), seed=seed, device=device, holdout=holdout),
                                   **fields)
    known = {f.name for f in dataclasses.fields(kind)}
    rounding = kind.from_schedule(schedule, **{k: v for k, v in fields.items() if k in known})
    return recon_settings(rounding, activation_bits=activation_bits, seed=seed, device=device, holdout=holdout)
