"""Fast evaluation of one-layer weight swaps for :mod:`onnxq.mixed.sensitivity`.

The *feed model* is the 8-bit quantized model with every candidate layer's weight (and bias) a
float graph input. Swapping layer ``l``'s weights changes only the nodes that depend on ``l``'s
output, so each layer gets a *suffix model*: the descendants of ``l`` (``l`` included), whose
inputs are the *frontier* (the data tensors those nodes read but do not compute, e.g. ``l``'s own
input and a residual branch) plus the weight inputs of the layers among them. Per held-out batch,
one run of the full model at base weights gives the graph outputs and the frontier values of a
group of layers; each swap then runs only its suffix. Outputs the suffix does not reach keep their
base values. Results are identical to running the whole feed model (the prefix is unchanged).

Scores against the float outputs ``r`` (per sample ``i``, outputs flattened and concatenated):
``mse = mean_i sum_outputs mean_k (o - r)^2``, ``cosine = mean_i (1 - cos(o_i, r_i))`` and
``metric = m(r) - m(o)`` on the first output of all samples (higher ``m`` is better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from onnxq.core import graph as g
from onnxq.core.layers import node_key
from onnxq.data.capture import session

#: Candidate layers whose frontier values are held in memory at once (per held-out batch).
GROUP = 8


class _Scores:
    """Running sums of the scores of one configuration."""

    def __init__(self) -> None:
        self.sq = 0.0
        self.cos = 0.0
        self.n = 0
        self.firsts: list[np.ndarray] = []

    def add(self, outs: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
        outs = [np.asarray(o, dtype=np.float64) for o in outs]
        for o, r in zip(outs, ref):
            self.sq += float(np.sum((o - r) ** 2)) / max(1, r[0].size)
        a = np.concatenate([o.reshape(o.shape[0], -1) for o in outs], axis=1)
        b = np.concatenate([r.reshape(r.shape[0], -1) for r in ref], axis=1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.where(denom > 0, denom, 1.0), 1.0)
        self.cos += float(np.sum(1.0 - cos))
        self.n += a.shape[0]
        self.firsts.append(outs[0])

    def result(self, metric: Callable[[np.ndarray], float] | None, float_score: float | None) -> dict[str, float]:
        out = {"mse": self.sq / max(1, self.n), "cosine": self.cos / max(1, self.n)}
        if metric is not None:
            out["metric"] = float(float_score - metric(np.concatenate(self.firsts)))
        return out


class SwapEvaluator:
    """Scores of the base weights and of one-layer swaps on held-out batches.

    Args:
        reference: the float model (for the reference outputs).
        feed_model: the 8-bit model with weight/bias graph inputs.
        slots: layer name -> (weight input name, bias input name or None).
        base: input name -> base (8-bit) value of every weight/bias input.
        batches: held-out feeds.
        metric: optional score of the first output (higher is better).
    """

    def __init__(self, reference: onnx.ModelProto, feed_model: onnx.ModelProto,
                 slots: dict[str, tuple[str, str | None]], base: dict[str, np.ndarray],
                 batches: Sequence[dict[str, np.ndarray]], metric: Callable[[np.ndarray], float] | None) -> None:
        self.feed_model, self.slots, self.base = feed_model, slots, base
        self.batches = [dict(b) for b in batches]
        float_sess = session(reference)
        self.float_out = [[np.asarray(o, dtype=np.float64) for o in float_sess.run(None, b)] for b in self.batches]
        self.metric = metric
        self.float_score = metric(np.concatenate([o[0] for o in self.float_out])) if metric else None
        self.graph = gs.import_onnx(feed_model)
        self.graph.toposort()
        self.outputs = [t.name for t in self.graph.outputs]

    def run(self, swaps: dict[str, dict[int, tuple[np.ndarray, np.ndarray | None]]]
            ) -> tuple[dict[str, float], dict[str, dict[int, dict[str, float]]]]:
        """Base scores and ``scores[layer][bits]`` for ``swaps[layer][bits] = (weight, bias)``."""
        base_scores = _Scores()
        scores = {name: {b: _Scores() for b in per} for name, per in swaps.items()}
        names = list(swaps)
        groups = [names[i:i + GROUP] for i in range(0, len(names), GROUP)]
        total = sum(len(swaps[n]) for n in names) * len(self.batches)
        bar = tqdm(total=total, desc="sensitivity", unit="eval", leave=False, disable=None)
        for k, group in enumerate(groups):
            subs = {name: self._suffix(name) for name in group}
            frontier = sorted({t for sub in subs.values() for t in sub[1]} - set(self.outputs))
            full = session(g.to_model(_with_outputs(self.graph, frontier)), _ALL)
            out_names = [o.name for o in full.get_outputs()]
            for feed, ref in zip(self.batches, self.float_out):
                values = dict(zip(out_names, full.run(None, {**feed, **self.base})))
                base_outs = [values[n] for n in self.outputs]
                if k == 0:
                    base_scores.add(base_outs, ref)
                for name in group:
                    sess, inputs, outs = subs[name]
                    for bits, (w, b) in swaps[name].items():
                        weights = self._weights(name, w, b)
                        feed_sub = {i: (weights[i] if i in weights else values[i] if i in values else feed[i])
                                    for i in inputs}
                        got = dict(zip(outs, sess.run(outs, feed_sub)))
                        scores[name][bits].add([got.get(n, values[n]) for n in self.outputs], ref)
                        bar.update(1)
        bar.close()
        result = {name: {b: s.result(self.metric, self.float_score) for b, s in per.items()}
                  for name, per in scores.items()}
        return base_scores.result(self.metric, self.float_score), result

    def _weights(self, name: str, w: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
        weights = dict(self.base)
        w_in, b_in = self.slots[name]
        weights[w_in] = w
        if b_in is not None:
            if b is None:
                raise RuntimeError(f"internal error: {name} has a bias at 8 bits but none at another width")
            weights[b_in] = b
        return weights

    def _suffix(self, name: str) -> tuple[object, list[str], list[str]]:
        """(session, input names, output names) of the descendants of layer ``name``."""
        graph = self.graph.copy()
        graph.toposort()
        start = next(n for n in graph.nodes if node_key(n) == name)
        reached = {id(start)}
        made: set[str] = {t.name for t in start.outputs}
        for node in graph.nodes:
            if id(node) not in reached and any(t.name in made for t in node.inputs):
                reached.add(id(node))
                made.update(t.name for t in node.outputs)
        needed_consts = {id(n) for n in graph.nodes if id(n) not in reached and _constant_only(n)}
        frontier: dict[str, gs.Tensor] = {}
        for node in graph.nodes:
            if id(node) not in reached:
                continue
            for t in node.inputs:
                if isinstance(t, gs.Constant) or not t.name or t.name in made:
                    continue
                if t.inputs and id(t.inputs[0]) in needed_consts:
                    continue
                frontier[t.name] = t
        for t in frontier.values():
            t.inputs.clear()
            if t.dtype is None:  # a graph input needs a type; data tensors here are float
                t.dtype = np.float32
        graph.inputs = list(frontier.values())
        graph.outputs = [t for t in graph.outputs if t.name in made]
        graph.cleanup(remove_unused_graph_inputs=True).toposort()
        model = g.to_model(graph)
        sess = session(model, _ALL)
        return sess, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]


def _constant_only(node: gs.Node) -> bool:
    return all(isinstance(t, gs.Constant) or not t.name for t in node.inputs)


def _with_outputs(graph: gs.Graph, names: Sequence[str]) -> gs.Graph:
    copy = graph.copy()
    tensors = copy.tensors()
    copy.outputs = list(copy.outputs) + [tensors[n] for n in names if n in tensors]
    return copy


def _all_level():
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL


_ALL = _all_level()
