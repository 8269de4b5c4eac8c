"""Calibration augmentation (onnxq.data.augment) and its use by ReconstructPass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq.config import BRECQ
from onnxq.data.augment import augment_feeds, image_layout
from onnxq.data.batches import count_samples, rebatch
from onnxq.errors import UserError
from tests.helpers import adaquant_config, engine_config, mrecg_iters, recon_config

MODELS = Path(__file__).resolve().parents[1] / "models"


def _images(n=5, c=3, h=12, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def test_layout_detection():
    assert image_layout("x", _images()) == "NCHW"
    assert image_layout("x", _images().transpose(0, 2, 3, 1)) == "NHWC"
    assert image_layout("ids", np.zeros((2, 3, 4, 5), np.int64)) is None
    assert image_layout("x", np.zeros((2, 3, 4), np.float32)) is None
    with pytest.raises(UserError, match="channel axis"):
        image_layout("x", np.zeros((2, 16, 8, 32), np.float32))


def test_originals_first_then_flip_then_crops():
    x = _images()
    out = augment_feeds([{"x": x[:3]}, {"x": x[3:]}], copies=3, seed=1)
    assert count_samples(out) == 4 * len(x)
    got = np.concatenate([f["x"] for f in out])
    np.testing.assert_array_equal(got[:5], x)                 # originals untouched, first
    np.testing.assert_array_equal(got[5:10], x[..., ::-1])    # view 1: the horizontal mirror
    crops = got[10:]
    assert crops.shape == (10, *x.shape[1:]) and crops.dtype == np.float32
    assert np.isfinite(crops).all() and not np.allclose(crops[:5], x)
    # a resized crop stays inside the image's value range (bilinear interpolation)
    assert crops.min() >= x.min() - 1e-5 and crops.max() <= x.max() + 1e-5


def test_nhwc_views_match_nchw_views_and_other_inputs_repeat():
    x = _images()
    scale = np.arange(5, dtype=np.float32)[:, None]
    a = augment_feeds([{"x": x, "s": scale}], copies=2, seed=3)
    b = augment_feeds([{"x": x.transpose(0, 2, 3, 1), "s": scale}], copies=2, seed=3)
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_allclose(fa["x"], fb["x"].transpose(0, 3, 1, 2), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(fa["s"], scale)


def test_seeded():
    feeds = [{"x": _images()}]
    same = [augment_feeds(feeds, 3, seed=7) for _ in range(2)]
    other = augment_feeds(feeds, 3, seed=8)
    for fa, fb in zip(*same, strict=True):
        np.testing.assert_array_equal(fa["x"], fb["x"])
    assert not np.array_equal(same[0][-1]["x"], other[-1]["x"])


def test_no_image_input_is_a_user_error():
    with pytest.raises(UserError, match="4-D float image input"):
        augment_feeds([{"tokens": np.zeros((2, 7), np.int64)}], copies=1)
    assert augment_feeds([{"tokens": np.zeros((2, 7), np.int64)}], copies=0)[0]["tokens"].shape == (2, 7)


def test_optional_views_skip_a_model_without_an_image_input():
    tokens = [{"tokens": np.arange(14, dtype=np.int64).reshape(2, 7)}]
    out = augment_feeds(tokens, copies=3, optional=True)
    assert len(out) == 1 and np.array_equal(out[0]["tokens"], tokens[0]["tokens"])
    images = augment_feeds([{"x": _images()}], copies=3, optional=True)  # optional or not, images get views
    assert len(images) == 4


def test_rebatch_cuts_the_feed_that_crosses_the_limit():
    feeds = [{"x": _images(4)}, {"x": _images(4)}]
    got = list(rebatch(feeds, 4, limit=6))
    assert [f["x"].shape[0] for f in got] == [4, 2]
    assert count_samples(rebatch(feeds, 4, limit=100)) == 8


def test_config_checks():
    assert engine_config("brecq", "fast", augment=2).augment == 2
    with pytest.raises(UserError, match="augment"):
        BRECQ.fast(augment=-1)
    with pytest.raises(UserError, match="holdout"):
        engine_config("brecq", "fast", augment=1, holdout=8)
    assert recon_config(onnxq.QuantConfig(weight_bits=4, method="qdrop", recon_augment=1)).augment == 1
    with pytest.raises(UserError, match="recon_augment"):
        onnxq.QuantConfig(weight_bits=4, method="rtn", recon_augment=1)
    with pytest.raises(UserError, match="augment"):
        onnxq.QuantConfig(weight_bits=4, method="brecq", recon_augment=-2)


def test_reconstruction_fits_on_the_augmented_samples():
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    calib = [{"input": x[i:i + 4]} for i in range(0, 24, 4)]
    config = onnxq.QuantConfig(weight_bits=4, method="qdrop", recon_iters=4, recon_samples=10,
                               recon_batch_size=8, recon_augment=2)
    first = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, config)
    rec = first.report["reconstruction"]
    assert rec["augment"] == 2 and rec["samples"] == 30
    assert all(b["samples"] == 30 for b in rec["blocks"])
    assert first.validation.ok
    again = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, config)
    assert first.model.SerializeToString() == again.model.SerializeToString()


def test_long_schedule_is_fast_with_1000_iterations_and_three_views():
    def recon(**kw):
        return recon_config(onnxq.QuantConfig(weight_bits=4, method="brecq", **kw))

    long, fast = recon(schedule="long"), recon()
    assert (long.iters, long.augment, long.augment_optional) == (1000, 3, True)
    assert dataclasses.replace(long, iters=fast.iters, augment=0, augment_optional=False) == fast
    assert long.act_iters == 0  # 8-bit activations: no step phase, as on fast
    assert recon(schedule="long", activation_bits=4).act_iters == 250
    # views the user asks for are required; 0 turns the schedule's off; other overrides keep them
    asked = recon(schedule="long", recon_augment=1)
    assert (asked.augment, asked.augment_optional) == (1, False)
    assert recon(schedule="long", recon_augment=0).augment == 0
    shorter = recon(schedule="long", recon_iters=500)
    assert (shorter.iters, shorter.augment) == (500, 3)
    assert recon(schedule="fast").augment == recon(schedule="paper").augment == 0
    # AdaQuant and MRECG follow the fast schedule's rules on long
    aq = onnxq.QuantConfig(weight_bits=4, method="adaquant", schedule="long")
    assert adaquant_config(aq) == adaquant_config(onnxq.QuantConfig(weight_bits=4, method="adaquant"))
    assert mrecg_iters(onnxq.QuantConfig(weight_bits=4, method="mrecg", schedule="long")) == "per_block"
    with pytest.raises(UserError, match="schedule"):
        onnxq.QuantConfig(weight_bits=4, method="brecq", schedule="longer")


def test_long_schedule_fits_images_on_views_and_other_models_without():
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    calib = [{"input": x[i:i + 4]} for i in range(0, 24, 4)]
    config = onnxq.QuantConfig(weight_bits=4, method="brecq", schedule="long", recon_iters=3, recon_samples=8,
                               recon_batch_size=8)
    rec = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, config).report["reconstruction"]
    assert (rec["iters"], rec["augment"], rec["samples"]) == (3, 3, 32)
    vectors = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    mlp = [{"x": vectors[i:i + 4]} for i in range(0, 16, 4)]
    result = onnxq.quantize(MODELS / "tiny_mlp.onnx", mlp, config)
    rec = result.report["reconstruction"]
    assert (rec["iters"], rec["augment"], rec["samples"]) == (3, 0, 8)
    assert result.validation.ok
    with pytest.raises(UserError, match="image input"):  # views the user asked for are not dropped
        onnxq.quantize(MODELS / "tiny_mlp.onnx", mlp, dataclasses.replace(config, recon_augment=3))
