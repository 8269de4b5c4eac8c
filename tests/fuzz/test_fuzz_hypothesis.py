"""Hypothesis-generated cases: byte mutations of a valid model, random flag combinations, random data arrays.

Deterministic (``derandomize=True``, no example database, no shrinking) and bounded (``max_examples``). Every
example runs the CLI once; the failures are collected and reported together at the end of each test, so one
broken example does not hide the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz.flags import POOL
from tests.fuzz.harness import Case, describe, run_and_check
from tests.fuzz.models import base_bytes, images, quantize_words, save, save_npz, write_base

pytestmark = pytest.mark.slow

SETTINGS = settings(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=False)
MODEL = base_bytes()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """The valid model file with 1-4 edits: flipped bytes, overwritten runs, inserted or deleted runs, a cut."""
    data = bytearray(MODEL)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "varint"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            run = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(run)] = run
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "varint" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def _run_examples(tmp: Path, label: str, failures: list[str], case: Case) -> None:
    outcome, problems = run_and_check(case, tmp / case.id)
    if problems:
        failures.append(describe(outcome, problems))


def _id(label: str, payload: bytes) -> str:
    return f"hyp-{label}-{hashlib.sha256(payload).hexdigest()[:10]}"


def test_model_byte_mutations(tmp_path: Path) -> None:
    failures: list[str] = []

    @settings(SETTINGS, max_examples=30)
    @given(blob=mutations())
    def one(blob: bytes) -> None:
        def build(d: Path) -> list[str]:
            (d / "m.onnx").write_bytes(blob)
            save_npz(d / "d.npz", x=images())
            (d / "notes.txt").write_text("notes\n")
            return quantize_words()
        case = Case(_id("bytes", blob), build)
        if not (tmp_path / case.id).exists():
            _run_examples(tmp_path, "bytes", failures, case)

    one()
    assert not failures, f"{len(failures)} failing mutation(s):\n\n" + "\n\n".join(failures)


def test_flag_combinations(tmp_path: Path) -> None:
    failures: list[str] = []

    @settings(SETTINGS, max_examples=30)
    @given(groups=st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=4, unique=True))
    def one(groups: list[int]) -> None:
        words = [w for k in groups for w in POOL[k]]

        def build(d: Path) -> list[str]:
            write_base(d)
            return quantize_words(extra=words)
        case = Case(_id("flags", "\0".join(words).encode()), build)
        if not (tmp_path / case.id).exists():
            _run_examples(tmp_path, "flags", failures, case)

    one()
    assert not failures, f"{len(failures)} failing flag combination(s):\n\n" + "\n\n".join(failures)


_DTYPES = ["float32", "float16", "float64", "int64", "uint8"]
_VALUES = ["normal", "zeros", "const", "huge", "tiny", "nan", "inf"]


def _array(shape: tuple[int, ...], dtype: str, values: str) -> np.ndarray:
    rng = np.random.default_rng(list(shape) + [len(dtype), len(values)])
    a = rng.standard_normal(shape)
    if values == "zeros":
        a = np.zeros(shape)
    elif values == "const":
        a = np.full(shape, 2.5)
    elif values == "huge":
        a = a * 1e30
    elif values == "tiny":
        a = a * 1e-30
    elif values in ("nan", "inf") and a.size:
        a.reshape(-1)[:: max(1, a.size // 3)] = np.nan if values == "nan" else np.inf
    with np.errstate(all="ignore"):
        return a.astype(dtype) if np.dtype(dtype).kind == "f" else np.nan_to_num(a).clip(-1e6, 1e6).astype(dtype)


def test_random_calibration_arrays(tmp_path: Path) -> None:
    failures: list[str] = []
    dims = st.sampled_from([0, 1, 2, 3, 8, 16])

    @settings(SETTINGS, max_examples=25)
    @given(n=st.integers(0, 40), c=st.sampled_from([1, 3, 4]), hw=st.tuples(dims, dims),
           dtype=st.sampled_from(_DTYPES), values=st.sampled_from(_VALUES), batch=st.sampled_from([1, "N"]))
    def one(n: int, c: int, hw: tuple[int, int], dtype: str, values: str, batch: int | str) -> None:
        array = _array((n, c, *hw), dtype, values)

        def build(d: Path) -> list[str]:
            from tests.fuzz.models import base_model

            save(base_model(batch=batch), d / "m.onnx")
            save_npz(d / "d.npz", x=array)
            (d / "notes.txt").write_text("notes\n")
            return quantize_words()
        key = f"{n}-{c}-{hw}-{dtype}-{values}-{batch}".encode()
        case = Case(_id("data", key), build)
        if not (tmp_path / case.id).exists():
            _run_examples(tmp_path, "data", failures, case)

    one()
    assert not failures, f"{len(failures)} failing array(s):\n\n" + "\n\n".join(failures)
