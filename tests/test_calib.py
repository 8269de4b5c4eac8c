"""Tests for onnxq.data.loaders: loaders, CalibrationSet, feed validation and image recipes."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxq.data import loaders as calib
from onnxq.data.loaders import (
    PRESETS,
    CalibrationSet,
    ImageRecipe,
    InputInfo,
    from_image_dir,
    from_iterable,
    from_npy,
    from_npz,
    load_calibration,
    model_inputs,
    random_like,
)
from onnxq.errors import UserError


def make_model(*inputs: tuple[str, int, list | None], initializers: dict[str, np.ndarray] | None = None):
    """A model whose graph inputs are ``inputs`` (name, elem type, shape); the graph just Identities them."""
    initializers = initializers or {}
    infos = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    infos += [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in initializers.items()]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()]
    nodes = [helper.make_node("Identity", [i.name], [f"out_{k}"]) for k, i in enumerate(infos)]
    outs = [helper.make_tensor_value_info(f"out_{k}", i.type.tensor_type.elem_type, None)
            for k, i in enumerate(infos)]
    return helper.make_model(helper.make_graph(nodes, "g", infos, outs, inits))


F32 = TensorProto.FLOAT
IMG = make_model(("img", F32, ["N", 3, 16, 24]))
VEC = [InputInfo("x", ("N", 4), np.float32)]
TWO = [InputInfo("a", ("N", 3), np.float32), InputInfo("b", ("N", 2), np.int64)]


def write_images(folder, sizes, seed=0, fmt="PNG"):
    """Seeded random RGB images named img_<k> with (W, H) ``sizes``; returns their pixels (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    out = []
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{k}.{fmt.lower()}", format=fmt)
        out.append(pixels)
    return out


# ----------------------------------------------------------------------------------------- inputs


def test_model_inputs_skips_initializers_and_keeps_dims():
    model = make_model(
        ("x", F32, ["batch", 3, None]), ("ids", TensorProto.INT64, [2]),
        initializers={"w": np.ones((2, 2), np.float32)},
    )
    got = model_inputs(model)
    assert [i.name for i in got] == ["x", "ids"]
    assert got[0].shape == ("batch", 3, None) and got[0].dtype == np.float32
    assert got[1].shape == (2,) and got[1].dtype == np.int64


# ----------------------------------------------------------------------------------------- npz / npy


def test_npz_roundtrip_batches_and_reiterates(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((10, 3), dtype=np.float32), rng.integers(0, 5, (10, 2))
    np.savez(tmp_path / "c.npz", a=a, b=b)
    cs = from_npz(tmp_path / "c.npz", TWO, batch_size=4)
    assert len(cs) == 3 and cs.num_samples == 10 and cs.batch_sizes == (4, 4, 2)
    for _ in range(2):  # re-iterable
        feeds = list(cs)
        np.testing.assert_array_equal(np.concatenate([f["a"] for f in feeds]), a)
        np.testing.assert_array_equal(np.concatenate([f["b"] for f in feeds]), b)
    assert feeds[0]["b"].dtype == np.int64 and feeds[0]["a"].flags.c_contiguous
    np.testing.assert_array_equal(cs[-1]["a"], a[8:])


def test_npz_compressed_and_single_array_any_key(tmp_path, caplog):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.savez_compressed(tmp_path / "c.npz", whatever=x)
    with caplog.at_level(logging.INFO, logger="onnxq.data.loaders"):
        cs = from_npz(tmp_path / "c.npz", VEC, batch_size=4)
    assert "whatever" in caplog.text
    np.testing.assert_array_equal(np.concatenate(list(f["x"] for f in cs)), x)


def test_npy_roundtrip_and_limit(tmp_path):
    x = np.random.default_rng(2).standard_normal((7, 4)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    cs = from_npy(tmp_path / "c.npy", VEC, batch_size=2, limit=5)
    assert cs.batch_sizes == (2, 2, 1)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in cs]), x[:5])
    with pytest.raises(UserError, match=r"\.npz"):
        from_npy(tmp_path / "c.npy", TWO)


def test_npz_key_mismatch_and_sample_counts(tmp_path):
    np.savez(tmp_path / "k.npz", a=np.zeros((2, 3), np.float32), c=np.zeros((2, 2), np.int64))
    with pytest.raises(UserError, match=r"holds arrays \['a', 'c'\] but the model inputs are \['a', 'b'\]"):
        from_npz(tmp_path / "k.npz", TWO)
    np.savez(tmp_path / "n.npz", a=np.zeros((2, 3), np.float32), b=np.zeros((3, 2), np.int64))
    with pytest.raises(UserError, match="different sample counts"):
        from_npz(tmp_path / "n.npz", TWO)


def test_npz_bad_data_fails_early_or_at_its_batch(tmp_path):
    np.savez(tmp_path / "r.npz", x=np.zeros((4, 5), np.float32))
    with pytest.raises(UserError, match=r"axis 1 is 5, expected 4"):
        from_npz(tmp_path / "r.npz", VEC)  # first batch is checked at construction
    x = np.zeros((6, 4), np.float32)
    x[5, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    cs = from_npz(tmp_path / "nan.npz", VEC, batch_size=2)
    cs[0], cs[1]
    with pytest.raises(UserError, match=r"calibration input 'x' batch 2 contains NaN: clean the data"):
        cs[2]


def test_fixed_batch_dim(tmp_path, caplog):
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 4), np.float32))
    with pytest.raises(UserError, match="fixed batch dim of 1 but batch_size=2: use batch_size=1"):
        from_npz(tmp_path / "c.npz", [InputInfo("x", (1, 4), np.float32)], batch_size=2)
    with caplog.at_level(logging.WARNING):
        cs = from_npz(tmp_path / "c.npz", [InputInfo("x", (4, 4), np.float32)], batch_size=4)
    assert cs.batch_sizes == (4, 4) and "dropping the last 2" in caplog.text


# ----------------------------------------------------------------------------------------- validation


def _err(feeds, inputs=TWO):
    with pytest.raises(UserError) as info:
        from_iterable(feeds, inputs)
    message = str(info.value)
    assert "\n" not in message
    return message


def good(n=2):
    return {"a": np.zeros((n, 3), np.float32), "b": np.zeros((n, 2), np.int64)}


def test_validation_names():
    msg = _err([good(), {"a": np.zeros((2, 3), np.float32)}])
    assert "batch 1 is missing input(s) ['b']" in msg and "expects ['a', 'b'], got ['a']" in msg
    msg = _err([{**good(), "c": np.zeros(2)}])
    assert "unknown input(s) ['c']" in msg
    assert "not a dict" in _err([[1, 2]])
    assert "empty" in _err([])


@pytest.mark.parametrize(
    "feed, pieces",
    [
        ({"a": np.zeros(3, np.float32)}, ["input 'a' batch 0", "rank 1", "(N, 3)", "add the leading batch"]),
        ({"a": np.zeros((2, 4), np.float32)}, ["input 'a' batch 0", "(2, 4)", "axis 1 is 4, expected 3"]),
        ({"b": np.zeros((3, 2), np.int64)}, ["input 'b' batch 0", "symbolic dim 'N'", "is 3 but it is 2"]),
        ({"a": np.zeros((2, 3), np.int32)}, ["input 'a' batch 0", "dtype int32", "wants float32"]),
        ({"b": np.zeros((2, 2), np.float32)}, ["input 'b'", "dtype float32", "wants int64"]),
        ({"b": np.zeros((2, 2), np.uint64)}, ["dtype uint64", "wants int64"]),
        ({"a": np.full((2, 3), np.inf, np.float32)}, ["input 'a' batch 0 contains Inf: clean the data"]),
        ({"a": np.full((2, 3), 1e300)}, ["input 'a' batch 0 overflows float32"]),
    ],
)
def test_validation_shape_dtype_values(feed, pieces):
    msg = _err([{**good(), **feed}])
    for piece in pieces:
        assert piece in msg


def test_validation_allowed_casts_warn_once(caplog):
    feeds = [{"a": np.ones((2, 3)), "b": np.ones((2, 2), np.int32)} for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        cs = from_iterable(iter(feeds), TWO)  # a generator is materialised
    assert [f["a"].dtype for f in cs] == [np.float32] * 3 and cs[0]["b"].dtype == np.int64
    assert caplog.text.count("float64") == 1
    half = from_iterable([{"a": np.ones((1, 3), np.float16), "b": np.ones((1, 2), np.int8)}], TWO)
    assert half[0]["a"].dtype == np.float32 and half[0]["b"].dtype == np.int64


# ----------------------------------------------------------------------------------------- set operations


def test_split_take_slices():
    cs = random_like(VEC, 10, batch_size=1)
    calib_part, hold = cs.split(3)
    assert (len(calib_part), len(hold)) == (7, 3)
    np.testing.assert_array_equal(hold[0]["x"], cs[7]["x"])
    assert isinstance(cs[2:5], CalibrationSet) and len(cs[2:5]) == 3
    np.testing.assert_array_equal(cs[2:5][-1]["x"], cs[4]["x"])
    assert len(cs.take(2)) == 2 and len(cs.take(100)) == 10
    assert len(cs.split(0)[1]) == 0
    with pytest.raises(UserError, match="holdout=10"):
        cs.split(10)
    with pytest.raises(UserError, match="holdout=-1"):
        cs.split(-1)
    with pytest.raises(IndexError):
        cs[10]


def test_random_like_dims_and_determinism():
    inputs = [InputInfo("x", ("N", 3, "L"), np.float32), InputInfo("ids", ("N", "L"), np.int64)]
    with pytest.raises(UserError, match=r"axis 2 is symbolic dim 'L': pass dim_values=\{'L': size\}"):
        random_like(inputs, 4)
    cs = random_like(inputs, 5, batch_size=2, dim_values={"L": 7}, seed=3)
    assert cs.batch_sizes == (2, 2, 1)
    assert cs[2]["x"].shape == (1, 3, 7) and cs[0]["ids"].dtype == np.int64
    again = random_like(inputs, 5, batch_size=2, dim_values={"L": 7}, seed=3)
    np.testing.assert_array_equal(again[1]["x"], cs[1]["x"])  # batch k does not depend on access order
    assert not np.array_equal(cs[0]["x"], cs[1]["x"])  # batches differ
    assert not np.array_equal(random_like(inputs, 5, dim_values={"L": 7}, seed=4)[0]["x"], cs[0]["x"][:1])
    assert random_like(make_model(("x", F32, [None, 2])), 1)[0]["x"].shape == (1, 2)


# ----------------------------------------------------------------------------------------- images


def test_recipe_numerics_layout_and_bgr(tmp_path):
    (pixels,) = write_images(tmp_path / "im", [(24, 16)])
    base = ImageRecipe(size=(16, 24), resize_shorter=None, crop="none", scale=255.0,
                       mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    path = tmp_path / "im" / "img_0.png"
    got = base.load(path)
    want = (pixels / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 0.125])
    assert got.shape == (3, 16, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    nhwc = ImageRecipe(size=(16, 24), resize_shorter=None, layout="NHWC").load(path)
    np.testing.assert_array_equal(nhwc, pixels.astype(np.float32))
    bgr = ImageRecipe(size=(16, 24), resize_shorter=None, layout="NHWC", channel_order="BGR",
                      mean=(1.0, 2.0, 3.0)).load(path)
    want_bgr = pixels[:, :, ::-1].astype(np.float32) - np.array([1, 2, 3], np.float32)
    np.testing.assert_array_equal(bgr, want_bgr)


def test_recipe_resize_and_center_crop(tmp_path):
    land, port = write_images(tmp_path / "im", [(60, 40), (20, 30)])
    # the shorter side is already 40: no resampling, an exact crop
    crop = ImageRecipe(size=(32, 32), resize_shorter=40).load(tmp_path / "im" / "img_0.png")
    np.testing.assert_array_equal(crop, land[4:36, 14:46].astype(np.float32).transpose(2, 0, 1))
    got = ImageRecipe(size=(16, 16), resize_shorter=40).load(tmp_path / "im" / "img_1.png")
    resized = np.asarray(Image.fromarray(port).resize((40, 60), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(got, resized[22:38, 12:28].transpose(2, 0, 1))
    direct = ImageRecipe(size=(10, 12), crop="none").load(tmp_path / "im" / "img_1.png")
    assert direct.shape == (3, 10, 12)


def test_image_dir_order_limit_files_and_dtype(tmp_path):
    write_images(tmp_path / "im", [(24, 16)] * 4)
    write_images(tmp_path / "im2", [(24, 16)], seed=9, fmt="JPEG")
    (tmp_path / "im" / "notes.txt").write_text("not an image")
    recipe = ImageRecipe(size=(16, 24), resize_shorter=None)
    cs = from_image_dir(tmp_path / "im", IMG, recipe, batch_size=3)
    assert cs.batch_sizes == (3, 1) and cs[0]["img"].shape == (3, 3, 16, 24)
    np.testing.assert_array_equal(cs[1]["img"][0], recipe.load(tmp_path / "im" / "img_3.png"))
    picked = from_image_dir(tmp_path, IMG, recipe, files=["im/img_2.png", "im2/img_0.jpeg"], limit=1)
    np.testing.assert_array_equal(picked[0]["img"][0], recipe.load(tmp_path / "im" / "img_2.png"))
    assert len(picked) == 1
    u8_model = make_model(("img", TensorProto.UINT8, [1, 16, 24, 3]))
    u8 = from_image_dir(tmp_path / "im2", u8_model, "raw,size=16x24,resize=none,layout=NHWC")
    assert u8[0]["img"].dtype == np.uint8 and u8[0]["img"].shape == (1, 16, 24, 3)
    f16_model = make_model(("img", TensorProto.FLOAT16, ["N", 3, 16, 24]))
    half = from_image_dir(tmp_path / "im2", f16_model, recipe)
    assert half[0]["img"].dtype == np.float16


def test_image_dir_is_lazy(tmp_path, monkeypatch):
    write_images(tmp_path / "im", [(24, 16)] * 4)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    cs = from_image_dir(tmp_path / "im", IMG, "raw,size=16x24,resize=none", batch_size=2)
    assert opened == []
    (tmp_path / "im" / "img_3.png").unlink()
    assert cs[0]["img"].shape == (2, 3, 16, 24) and len(opened) == 2
    with pytest.raises(UserError, match=r"calibration batch 1: cannot read image '.*img_3.png'"):
        cs[1]
    (tmp_path / "im" / "img_0.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="calibration batch 0: cannot read image"):
        cs[0]


@pytest.mark.parametrize(
    "model, recipe, piece",
    [
        (make_model(("a", F32, ["N", 3, 16, 24]), ("b", F32, ["N"])), "raw", "images feed one input"),
        (make_model(("x", F32, ["N", 10])), "raw", "not an image batch (rank 4)"),
        (make_model(("x", F32, ["N", 16, 24, 3])), "raw,size=16x24", "use layout=NHWC"),
        (make_model(("x", F32, ["N", 1, 16, 24])), "raw,size=16x24", "wants 1 channels"),
        (make_model(("x", F32, ["N", 3, 32, 32])), "raw,size=16x24", "use size=32x32"),
        (make_model(("x", TensorProto.UINT8, ["N", 3, 16, 24])), "imagenet,size=16x24", "the 'raw' preset"),
    ],
)
def test_image_model_checks(tmp_path, model, recipe, piece):
    write_images(tmp_path / "im", [(24, 16)])
    with pytest.raises(UserError, match=piece.replace("(", r"\(").replace(")", r"\)")):
        from_image_dir(tmp_path / "im", model, recipe)


# ----------------------------------------------------------------------------------------- recipe strings


def test_recipe_from_string():
    text = "resize=256,crop=224,scale=255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,order=RGB"
    assert ImageRecipe.from_string(text) == PRESETS["imagenet"]
    assert ImageRecipe.from_string("imagenet") == PRESETS["imagenet"]
    r = ImageRecipe.from_string("imagenet, layout=nhwc, order=BGR, size=32x48, resize=none")
    got = (r.layout, r.channel_order, r.size, r.resize_shorter, r.scale)
    assert got == ("NHWC", "BGR", (32, 48), None, 255.0)
    assert ImageRecipe.from_string("crop=none,mean=5").crop == "none"
    assert ImageRecipe.from_string("crop=100x120,resize=128").size == (100, 120)
    lite = PRESETS["efficientnet-lite"]
    assert lite.mean == (127.0,) * 3 and lite.std == (128.0,) * 3
    assert lite.scale == 1.0 and lite.size == (224, 224) and lite.resize_shorter == 256
    assert PRESETS["raw"].is_identity and not PRESETS["imagenet"].is_identity


@pytest.mark.parametrize(
    "text, piece",
    [
        ("", "empty"),
        ("colour=red", "unknown key 'colour'"),
        ("mobilenet", "unknown image preset 'mobilenet'"),
        ("imagenet,raw", "several presets"),
        ("scale=abc", "not numbers"),
        ("resize=big", "not an integer"),
        ("size=1x2x3", "not N or HxW"),
        ("std=1/0/1", "contains 0"),
        ("mean=1/2", "1 or 3 finite values"),
        ("resize=100,crop=224", "smaller than the crop"),
        ("layout=NCWH", "use NCHW or NHWC"),
        ("order=RGBA", "use RGB or BGR"),
        ("crop=32,size=64", "crop and size that differ"),
    ],
)
def test_recipe_from_string_errors(text, piece):
    with pytest.raises(UserError, match=piece):
        ImageRecipe.from_string(text)


# ----------------------------------------------------------------------------------------- dispatch


def test_load_calibration_dispatch(tmp_path):
    x = np.random.default_rng(5).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    np.save(tmp_path / "c.npy", x)
    assert load_calibration(tmp_path / "c.npz", VEC, batch_size=2).batch_sizes == (2, 2, 1)
    assert load_calibration(str(tmp_path / "c.npy"), VEC, limit=3).num_samples == 3
    assert load_calibration(x, VEC, batch_size=5).batch_sizes == (5,)
    cs = load_calibration([{"x": x[:4]}, {"x": x[4:]}], VEC, limit=3)
    assert cs.batch_sizes == (3,) and cs[0]["x"].shape == (3, 4)
    assert load_calibration(cs, VEC) is cs
    rebound = load_calibration(cs, [InputInfo("x", ("N", 5), np.float32)])
    with pytest.raises(UserError, match="axis 1 is 4, expected 5"):
        rebound[0]
    assert len(load_calibration({"x": x}, VEC)) == 1
    write_images(tmp_path / "im", [(24, 16)] * 3)
    assert load_calibration(tmp_path / "im", IMG, recipe="raw,size=16x24", limit=2).num_samples == 2
    assert load_calibration(tmp_path / "im" / "img_1.png", IMG, recipe="raw,size=16x24").num_samples == 1


@pytest.mark.parametrize(
    "make_source, inputs, kwargs, piece",
    [
        (lambda d: d / "missing.npz", VEC, {}, "does not exist"),
        (lambda d: (d / "c.txt").write_text("1") and d / "c.txt", VEC, {}, "unsupported extension '.txt'"),
        (lambda d: (d / "empty").mkdir() or d / "empty", IMG, {"recipe": "raw,size=16x24"}, "has no images"),
        (lambda d: d, IMG, {}, "need an image recipe"),
        (lambda d: d, VEC, {}, "not an image batch"),
        (lambda d: d, VEC, {"recipe": "raw"}, "not an image batch"),
        (lambda d: 5, VEC, {}, "type int is not supported"),
        (lambda d: random_like(TWO, 2), VEC, {}, "rebuild it for this model"),
        (lambda d: np.zeros((2, 4), np.float32), TWO, {}, "one array cannot feed"),
        (lambda d: [], VEC, {"limit": 0}, "limit=0"),
    ],
)
def test_load_calibration_errors(tmp_path, make_source, inputs, kwargs, piece):
    with pytest.raises(UserError, match=piece):
        load_calibration(make_source(tmp_path), inputs, **kwargs)


def test_calib_module_exports():
    assert calib.CalibrationSet is CalibrationSet and set(calib.__all__) >= {"from_npz", "random_like"}


def test_paddle_style_dynamic_dims_are_anonymous():
    """Paddle writes the batch as dim_value -1 and unknown dims as dim_param '?'."""
    import onnx.helper as oh

    from onnxq.data.loaders import model_inputs as inputs_of

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    model = oh.make_model(oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    info = inputs_of(model)[0]
    assert info.shape == (None, 3, None, None)
    feeds = load_calibration([{"x": np.zeros((2, 3, 48, 192), np.float32)}], [info])
    assert feeds[0]["x"].shape == (2, 3, 48, 192)
