"""Cases of flags (tests/fuzz/flags.py) through ``onnxq quantize``."""

from __future__ import annotations

import pytest

from tests.fuzz.flags import CASES
from tests.fuzz.harness import Case, assert_case


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=() if c.fast else (pytest.mark.slow,)) for c in cases]


@pytest.mark.parametrize("case", params(CASES))
def test_flags(case: Case, tmp_path) -> None:
    assert_case(case, tmp_path / "case")
