"""Calibration data for the base model (input 'x', 1x3x8x8): odd values, shapes, dtypes and broken files."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fuzz.harness import Case
from tests.fuzz.models import base_model, images, quantize_words, save, save_npz

Builder = Callable[[Path], list[str]]


def _setup(d: Path, batch: int | str = 1) -> None:
    save(base_model(batch=batch), d / "m.onnx")
    (d / "notes.txt").write_text("notes\n")


def _arrays(arrays: Callable[[], dict[str, np.ndarray]], extra: list[str] | None = None,
            batch: int | str = 1, compressed: bool = False) -> Builder:
    def build(d: Path) -> list[str]:
        _setup(d, batch)
        if compressed:
            with open(d / "d.npz", "wb") as f:
                np.savez_compressed(f, **arrays())
        else:
            save_npz(d / "d.npz", **arrays())
        return quantize_words(extra=extra)
    return build


def _x(fn: Callable[[], np.ndarray]) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: {"x": fn()}


def _raw(name: str, data: Callable[[], bytes], extra: list[str] | None = None) -> Builder:
    def build(d: Path) -> list[str]:
        _setup(d)
        (d / name).write_bytes(data())
        return quantize_words(data=name, extra=extra)
    return build


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _with_nan(count: int, value: float = float("nan")) -> np.ndarray:
    a = images()
    a.reshape(-1)[:count] = value
    return a


def _corrupt_zip_header() -> bytes:
    b = bytearray(_npz_bytes(x=images()))
    b[0:4] = b"PK\x09\x09"
    return bytes(b)


def _corrupt_central_dir() -> bytes:
    b = bytearray(_npz_bytes(x=images()))
    k = b.rfind(b"PK\x01\x02")
    b[k + 10: k + 30] = b"\xff" * 20  # method, times, crc, sizes
    return bytes(b)


def _lying_npy_header() -> bytes:
    """A zip whose member claims shape (16, 3, 8, 8) but holds 10 bytes of payload."""
    header = _npy_bytes(images())[:128]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", header + b"\x00" * 10)
    return buf.getvalue()


def _huge_shape_header() -> bytes:
    """An npz member whose header says (10**12, 3, 8, 8) float32."""
    header = _npy_bytes(images())[:128].replace(b"(16, 3, 8, 8)", b"(1000000000000, 3, 8, 8)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", header + b"\x00" * 64)
    return buf.getvalue()


def _bad_member() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", b"not an npy at all")
    return buf.getvalue()


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}] * 16, dtype=object))
    return buf.getvalue()


def _zip_bomb_like() -> bytes:
    """A compressed member declaring a big array of zeros (compresses to a few KB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_bytes(np.zeros((4096, 3, 8, 8), np.float32)))
    return buf.getvalue()


def _png(width: int, height: int, color: tuple[int, int, int] = (128, 64, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR says ``width x height`` (over Pillow's MAX_IMAGE_PIXELS), with one IDAT row."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _image_folder(files: dict[str, Callable[[], bytes]], recipe: str | None = "raw,resize=8,crop=8",
                  batch: int | str = 1) -> Builder:
    def build(d: Path) -> list[str]:
        _setup(d, batch)
        (d / "imgs").mkdir()
        for name, data in files.items():
            (d / "imgs" / name).write_bytes(data())
        return quantize_words(data="imgs", extra=["--recipe", recipe] if recipe else [])
    return build


def _good_pngs(n: int = 6, size: int = 8) -> dict[str, Callable[[], bytes]]:
    rng = np.random.default_rng(0)
    out: dict[str, Callable[[], bytes]] = {}
    for k in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

        def png(p: np.ndarray = pixels) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="PNG")
            return buf.getvalue()
        out[f"img{k}.png"] = png
    return out


def _missing(d: Path) -> list[str]:
    _setup(d)
    return quantize_words(data="absent.npz")


def _missing_folder(d: Path) -> list[str]:
    _setup(d)
    return quantize_words(data="absent_dir/")


def _empty_folder(d: Path) -> list[str]:
    _setup(d)
    (d / "imgs").mkdir()
    return quantize_words(data="imgs", extra=["--recipe", "raw"])


def _data_is_model(d: Path) -> list[str]:
    _setup(d)
    return quantize_words(data="m.onnx")


def _npy(arr: Callable[[], np.ndarray]) -> Builder:
    def build(d: Path) -> list[str]:
        _setup(d)
        np.save(d / "d.npy", arr())
        return quantize_words(data="d.npy")
    return build


def _validation_set(fn: Callable[[Path], str]) -> Builder:
    def build(d: Path) -> list[str]:
        _setup(d)
        save_npz(d / "d.npz", x=images())
        return quantize_words(extra=["--validation", fn(d)])
    return build


def _v_npz(arr: np.ndarray, name: str = "v.npz") -> Callable[[Path], str]:
    def fn(d: Path) -> str:
        save_npz(d / name, x=arr)
        return name
    return fn


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _gray_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 77).save(buf, format="PNG")
    return buf.getvalue()


def _subfolder_images(d: Path) -> list[str]:
    _setup(d)
    (d / "imgs" / "sub").mkdir(parents=True)
    (d / "imgs" / "sub" / "a.png").write_bytes(_png(8, 8))
    return quantize_words(data="imgs", extra=["--recipe", "raw"])


def _single_image(d: Path) -> list[str]:
    _setup(d)
    (d / "a.png").write_bytes(_png(8, 8))
    return quantize_words(data="a.png", extra=["--recipe", "raw"])


def _with_batch(build: Builder, size: str) -> Builder:
    return lambda d: [*build(d), "--batch-size", size]


const_per_channel = lambda: np.broadcast_to(  # noqa: E731
    np.array([0.5, -1.0, 2.0], np.float32)[None, :, None, None], (16, 3, 8, 8)).copy()

CASES: list[Case] = [
    Case("data-normal", _arrays(_x(images))),
    Case("data-all-zeros", _arrays(_x(lambda: np.zeros((16, 3, 8, 8), np.float32)))),
    Case("data-constant-3", _arrays(_x(lambda: np.full((16, 3, 8, 8), 3.0, np.float32)))),
    Case("data-constant-neg", _arrays(_x(lambda: np.full((16, 3, 8, 8), -1.5, np.float32)))),
    Case("data-1x1-images", _arrays(_x(lambda: images(shape=(3, 1, 1)))), fast=True),
    Case("data-1x1-images-dynamic-model", _arrays(_x(lambda: images(shape=(3, 1, 1))), batch="N")),
    Case("data-const-per-channel", _arrays(_x(const_per_channel))),
    Case("data-const-per-channel-int4", _arrays(_x(const_per_channel), extra=["--weights", "int4"])),
    Case("data-4000x2-noise", _arrays(_x(lambda: _rng().standard_normal((4000, 2)).astype(np.float32))), fast=True),
    Case("data-flat-192", _arrays(_x(lambda: images().reshape(16, -1)))),
    Case("data-nhwc", _arrays(_x(lambda: images().transpose(0, 2, 3, 1).copy()))),
    Case("data-no-batch-axis", _arrays(_x(lambda: images()[0]))),
    Case("data-extra-axis", _arrays(_x(lambda: images()[:, None]))),
    Case("data-16x16-images", _arrays(_x(lambda: images(shape=(3, 16, 16))))),
    Case("data-4-channels", _arrays(_x(lambda: images(shape=(4, 8, 8))))),
    Case("data-1e30", _arrays(_x(lambda: np.full((16, 3, 8, 8), 1e30, np.float32)))),
    Case("data-normal-times-1e30", _arrays(_x(lambda: images() * np.float32(1e30)))),
    Case("data-neg-1e30", _arrays(_x(lambda: -np.abs(images()) * np.float32(1e30)))),
    Case("data-1e-30", _arrays(_x(lambda: images() * np.float32(1e-30)))),
    Case("data-one-outlier", _arrays(_x(lambda: _with_nan(1, 1e6)))),
    Case("data-fp32-max", _arrays(_x(lambda: _with_nan(3, float(np.finfo(np.float32).max))))),
    Case("data-nan-one", _arrays(_x(lambda: _with_nan(1))), fast=True),
    Case("data-nan-all", _arrays(_x(lambda: _with_nan(16 * 192)))),
    Case("data-inf-one", _arrays(_x(lambda: _with_nan(1, float("inf"))))),
    Case("data-neginf-one", _arrays(_x(lambda: _with_nan(1, float("-inf"))))),
    Case("data-int64", _arrays(_x(lambda: np.random.default_rng(0).integers(-3, 3, (16, 3, 8, 8))))),
    Case("data-uint8", _arrays(_x(lambda: np.random.default_rng(0).integers(0, 255, (16, 3, 8, 8), dtype=np.uint8)))),
    Case("data-float16", _arrays(_x(lambda: images().astype(np.float16)))),
    Case("data-float64", _arrays(_x(lambda: images().astype(np.float64)))),
    Case("data-bool", _arrays(_x(lambda: images() > 0))),
    Case("data-complex", _arrays(_x(lambda: images().astype(np.complex64)))),
    Case("data-fortran-order", _arrays(_x(lambda: np.asfortranarray(images())))),
    Case("data-wrong-name-single", _arrays(lambda: {"input": images()})),
    Case("data-wrong-name-two-arrays", _arrays(lambda: {"input": images(), "other": images()})),
    Case("data-extra-array", _arrays(lambda: {"x": images(), "other": images()})),
    Case("data-different-counts", _arrays(lambda: {"x": images(), "x2": images(n=3)})),
    Case("data-zero-samples", _arrays(_x(lambda: np.zeros((0, 3, 8, 8), np.float32)))),
    Case("data-one-sample", _arrays(_x(lambda: images(n=1)))),
    Case("data-two-samples", _arrays(_x(lambda: images(n=2)))),
    Case("data-scalar-array", _arrays(_x(lambda: np.float32(1.0)))),
    Case("data-many-samples", _arrays(_x(lambda: images(n=2000)))),
    Case("data-compressed", _arrays(_x(images), compressed=True)),
    Case("data-compressed-nan", _arrays(_x(lambda: _with_nan(5)), compressed=True)),
    Case("data-1x1-dynamic-batch-8", _arrays(_x(lambda: images(shape=(3, 1, 1))), batch="N",
                                             extra=["--batch-size", "8"])),
    Case("data-batch-size-0", _arrays(_x(images), extra=["--batch-size", "0"])),
    Case("data-batch-size-neg", _arrays(_x(images), extra=["--batch-size", "-3"])),
    Case("data-batch-size-4-fixed-model", _arrays(_x(images), extra=["--batch-size", "4"])),
    Case("data-batch-size-huge", _arrays(_x(images), batch="N", extra=["--batch-size", "100000"])),
    Case("data-calib-samples-0", _arrays(_x(images), extra=["--calib-samples", "0"])),
    Case("data-calib-samples-neg", _arrays(_x(images), extra=["--calib-samples", "-1"])),
    Case("data-npz-truncated-half", _raw("d.npz", lambda: _npz_bytes(x=images())[:3000]), fast=True),
    Case("data-npz-truncated-end", _raw("d.npz", lambda: _npz_bytes(x=images())[:-10])),
    Case("data-npz-truncated-22", _raw("d.npz", lambda: _npz_bytes(x=images())[:22])),
    Case("data-npz-corrupt-header", _raw("d.npz", _corrupt_zip_header)),
    Case("data-npz-corrupt-central-dir", _raw("d.npz", _corrupt_central_dir)),
    Case("data-npz-lying-npy-header", _raw("d.npz", _lying_npy_header)),
    Case("data-npz-huge-shape-header", _raw("d.npz", _huge_shape_header)),
    Case("data-npz-member-not-npy", _raw("d.npz", _bad_member)),
    Case("data-npz-pickled-objects", _raw("d.npz", _pickled)),
    Case("data-npz-compressed-big-zeros", _raw("d.npz", _zip_bomb_like)),
    Case("data-npz-empty", _raw("d.npz", lambda: _npz_bytes())),
    Case("data-npz-zero-bytes", _raw("d.npz", lambda: b"")),
    Case("data-npz-text", _raw("d.npz", lambda: b"x = [1, 2, 3]\n")),
    Case("data-npz-is-npy", _raw("d.npz", lambda: _npy_bytes(images()))),
    Case("data-npy-is-npz", _raw("d.npy", lambda: _npz_bytes(x=images()))),
    Case("data-npy-valid", _npy(images)),
    Case("data-npy-truncated", _raw("d.npy", lambda: _npy_bytes(images())[:500])),
    Case("data-npy-text", _raw("d.npy", lambda: b"hello")),
    Case("data-npy-pickled", _raw("d.npy", lambda: _npy_bytes(np.array([None] * 16, dtype=object)))),
    Case("data-npy-wrong-shape", _npy(lambda: images(shape=(2, 2)))),
    Case("data-csv-ext", _raw("d.csv", lambda: b"1,2,3\n")),
    Case("data-no-ext", _raw("data", lambda: _npz_bytes(x=images()))),
    Case("data-upper-NPZ", _raw("d.NPZ", lambda: _npz_bytes(x=images()))),
    Case("data-missing", _missing),
    Case("data-missing-folder", _missing_folder),
    Case("data-empty-folder", _empty_folder),
    Case("data-is-the-model", _data_is_model),
    Case("data-images-valid", _image_folder(_good_pngs()), judge="pixels"),
    Case("data-images-no-recipe", _image_folder(_good_pngs(), recipe=None)),
    Case("data-images-imagenet-recipe", _image_folder(_good_pngs(size=300), recipe="imagenet")),
    Case("data-images-bad-recipe", _image_folder(_good_pngs(), recipe="resize=-5,crop=abc")),
    Case("data-images-empty-recipe", _image_folder(_good_pngs(), recipe=",")),
    Case("data-images-1x1", _image_folder({"a.png": lambda: _png(1, 1), "b.png": lambda: _png(1, 1, (0, 0, 0))})),
    Case("data-images-1x1-no-resize", _image_folder({"a.png": lambda: _png(1, 1)}, recipe="raw")),
    Case("data-images-huge-sparse-png", _image_folder({**_good_pngs(3), "zz.png": lambda: _png_claiming(
        100000, 100000)}), fast=True),
    Case("data-images-huge-sparse-only", _image_folder({"big.png": lambda: _png_claiming(100000, 100000)})),
    Case("data-images-moderately-huge-png", _image_folder({"big.png": lambda: _png_claiming(12000, 12000)})),
    Case("data-images-0x0-png", _image_folder({"a.png": lambda: _png_claiming(0, 0)})),
    Case("data-images-text-as-png", _image_folder({**_good_pngs(2), "bad.png": lambda: b"not a png"})),
    Case("data-images-empty-png", _image_folder({**_good_pngs(2), "empty.png": lambda: b""})),
    Case("data-images-truncated-png", _image_folder({"t.png": lambda: _png(8, 8)[:40]})),
    Case("data-images-grayscale", _image_folder({"g.png": lambda: _gray_png()})),
    Case("data-images-subfolder-only", lambda d: _subfolder_images(d)),
    Case("data-images-dynamic-batch-4", _with_batch(_image_folder(_good_pngs(5), batch="N"), "4"), judge="pixels"),
    Case("data-single-image-file", lambda d: _single_image(d)),
    Case("data-validation-missing", _validation_set(lambda d: "nope.npz")),
    Case("data-validation-nan", _validation_set(_v_npz(_with_nan(10)))),
    Case("data-validation-wrong-shape", _validation_set(_v_npz(images(shape=(2, 2))))),
    Case("data-validation-zeros", _validation_set(_v_npz(np.zeros((8, 3, 8, 8), np.float32)))),
    Case("data-validation-is-calib", _validation_set(lambda d: "d.npz")),
    Case("data-validation-text", _validation_set(lambda d: (d / "v.npz").write_text("x") and "v.npz")),
]

