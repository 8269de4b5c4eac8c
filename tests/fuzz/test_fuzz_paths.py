"""Cases of paths (tests/fuzz/paths.py) through ``onnxq quantize``."""

from __future__ import annotations

import pytest

from tests.fuzz.harness import Case, assert_case
from tests.fuzz.paths import CASES


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=() if c.fast else (pytest.mark.slow,)) for c in cases]


@pytest.mark.parametrize("case", params(CASES))
def test_paths(case: Case, tmp_path) -> None:
    assert_case(case, tmp_path / "case")
