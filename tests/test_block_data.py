"""onnxq.blocks.cache: the weights-only copy of a QDQ model used by the adaround/brecq weight phase."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxq.blocks.cache import BlockData, TensorStore, weights_only
from onnxq.recon.batching import cache_layout
from tests.helpers import make_model, run_ort

_QDQ = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,2,5,5] x) => (float[N,3,5,5] y) <float[3,2,3,3] w_float, int8[3,2,3,3] wq, float[3] ws, float sx,
  uint8 zx, float sh, uint8 zh, int8 zc_lo, int8 zc_hi> {
    xq = QuantizeLinear (x, sx, zx)
    xd = DequantizeLinear (xq, sx, zx)
    wd = DequantizeLinear <axis=0> (wq, ws)
    h = Conv <pads=[1,1,1,1]> (xd, wd)
    r = Relu (h)
    rq = QuantizeLinear (r, sh, zh)
    rc = Clip (rq, zc_lo, zc_hi)
    rd = DequantizeLinear (rc, sh, zh)
    y2 = Conv <pads=[1,1,1,1], group=1> (rd, w3)
    yq = QuantizeLinear (y2, sh, zh)
    y = DequantizeLinear (yq, sh, zh)
}
"""


def _model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    ws = (np.abs(w).reshape(3, -1).max(1) / 7).astype(np.float32)
    wq = np.clip(np.round(w / ws[:, None, None, None]), -8, 7).astype(np.int8)
    w3 = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    text = _QDQ.replace("int8 zc_hi>", "int8 zc_hi, float[3,3,3,3] w3>").replace("float[3,2,3,3] w_float, ", "")
    model = make_model(text, wq=wq, ws=ws, w3=w3, sx=np.float32(0.05), zx=np.uint8(128), sh=np.float32(0.04),
                       zh=np.uint8(0), zc_lo=np.uint8(0), zc_hi=np.uint8(15))
    return model, wq.astype(np.float32) * ws[:, None, None, None], w3


def test_activation_quantizers_bypassed_weights_kept():
    model, w_hat, w3 = _model()
    stripped = weights_only(model)
    ops = [n.op_type for n in stripped.graph.node]
    # The input and the inner (Q -> Clip -> DQ) quantizers are gone; the weight DQ and the quantizer
    # that produces the graph output stay.
    assert ops == ["DequantizeLinear", "Conv", "Relu", "Conv", "QuantizeLinear", "DequantizeLinear"]
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 3  # the input is not modified

    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5)).astype(np.float32)
    got = run_ort(stripped, {"x": x}, level="disable")[0]
    h = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w_hat), padding=1))
    y2 = F.conv2d(h, torch.from_numpy(w3), padding=1).numpy()
    expected = np.clip(np.round(y2 / np.float32(0.04)), 0, 255) * np.float32(0.04)
    np.testing.assert_allclose(got, expected, atol=0.04 * 1.01)  # at most one step apart (ties in float32)
    assert np.mean(np.isclose(got, expected, atol=1e-6)) > 0.99
    # ... and differs from the fully quantized model (whose inner activations are 4-bit).
    assert not np.allclose(run_ort(model, {"x": x}, level="disable")[0], got)


def test_tensor_store_spills_beyond_budget_and_releases_per_block(tmp_path):
    store = TensorStore(budget_bytes=1000, spill_dir=tmp_path)
    kept = store.allocate("logits", (10, 10))  # 200 bytes in RAM, kept for the whole run
    assert not isinstance(kept, np.memmap)
    base = store.mark()
    for _ in range(3):  # three blocks of 1,200 bytes each: 800 fit in RAM, the rest spills
        a = store.allocate("x", (10, 40))
        b = store.allocate("y", (10, 20))
        assert not isinstance(a, np.memmap) and isinstance(b, np.memmap)
        b[:] = 1.0
        assert len(list(tmp_path.iterdir())) == 1
        store.release(base)
        assert store.used == 200 and not list(tmp_path.iterdir())  # spill files deleted
        assert float(b.sum()) == 200.0  # still readable while mapped
    store.close()


@pytest.mark.parametrize("budget", [10_000, 100])  # in RAM, and spilled to a memory-mapped file
def test_tensor_store_keeps_images_channels_last(tmp_path, budget):
    """4-D block tensors are NCHW arrays laid out NHWC, so the engine's channels-last batches need no
    transposed copy of the cache: the torch view is already channels-last."""
    store = TensorStore(budget_bytes=budget, spill_dir=tmp_path)
    a = store.allocate("x", (3, 4, 5, 6))
    values = np.arange(360, dtype=np.float16).reshape(3, 4, 5, 6)
    a[:] = values
    assert a.shape == (3, 4, 5, 6) and a.strides == (240, 2, 48, 8)
    np.testing.assert_array_equal(a, values)
    t = BlockData.as_torch([a[:2]])[0]
    assert t.is_contiguous(memory_format=torch.channels_last)
    assert cache_layout(t).data_ptr() == t.data_ptr()  # taken as is
    np.testing.assert_array_equal(t.numpy(), values[:2])
    flat = store.allocate("v", (3, 7))
    assert flat.flags.c_contiguous
    store.close()
