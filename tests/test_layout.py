"""The layout stays what docs/architecture.md says: every file listed, none over 500 lines, passes/
holding passes only, and the public names importable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _source_files() -> set[str]:
    out = set()
    for top in ("onnxq", "passes"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".c", ".toml", ".md") and "__pycache__" not in path.parts:
                out.add(path.relative_to(ROOT).as_posix())
    return out


def _documented_files() -> set[str]:
    """The files of the tree block in docs/architecture.md (indentation = nesting, two spaces a level)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    stack: list[str] = []
    files = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = re.split(r"\s{2,}", line.strip())[0]
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            files.add("/".join([*stack, name]))
    return files


def test_the_documented_tree_is_the_source_tree() -> None:
    documented, actual = _documented_files(), _source_files()
    assert sorted(actual - documented) == [], "files missing from docs/architecture.md"
    assert sorted(documented - actual) == [], "docs/architecture.md lists files that do not exist"


def test_no_module_over_500_lines() -> None:
    long = {f: n for f in _source_files() if f.endswith(".py")
            if (n := len((ROOT / f).read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_passes_hold_passes_only() -> None:
    """Every module of passes/ defines exactly one public Pass class; helpers used elsewhere live in onnxq/."""
    for path in sorted((ROOT / "passes").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]
        passes = [c for c in classes if c.endswith("Pass")]
        assert len(passes) == 1, (path, classes)
    users = []
    for path in (ROOT / "onnxq").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "onnxq.passes" or n.startswith("onnxq.passes.") for n in names) \
                    and "pipeline" not in path.parts:
                users.append(path.relative_to(ROOT).as_posix())
    assert users == [], "only onnxq/pipeline builds pass lists"
