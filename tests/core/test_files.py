"""Safe writes (onnxq.core.files): atomic, with the umask's mode, never over an input, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from onnxq.core.files import TEMP_PREFIX, OutputGuard, atomic_write_text, file_mode
from onnxq.errors import UserError


def test_atomic_write_gives_the_umask_mode_and_leaves_no_temp(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 == file_mode()
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk gone")

    from onnxq.core.files import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_guard_refuses_an_output_naming_an_input(tmp_path):
    data = tmp_path / "out.report.json"
    data.write_text("mine")
    guard = OutputGuard({"model": tmp_path / "out.onnx", "report": data}, [tmp_path / "m.onnx", data])
    with pytest.raises(UserError, match="would overwrite the input"):
        guard.prepare()
    assert data.read_text() == "mine"


def test_guard_sees_through_links_and_dots(tmp_path):
    real = tmp_path / "m.onnx"
    real.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    for out in (tmp_path / "sub" / ".." / "m.onnx", link):
        with pytest.raises(UserError, match="would overwrite the input"):
            OutputGuard({"model": out}, [real]).check()


@pytest.mark.parametrize("case", ["folder", "parent_file", "long_name"])
def test_guard_refuses_unwritable_paths_in_one_line(tmp_path, case):
    if case == "folder":
        (tmp_path / "o.report.json").mkdir()
        outputs = {"model": tmp_path / "o.onnx", "report": tmp_path / "o.report.json"}
    elif case == "parent_file":
        (tmp_path / "f").write_text("a file")
        outputs = {"model": tmp_path / "f" / "o.onnx"}
    else:
        outputs = {"model": tmp_path / ("x" * 300 + ".onnx")}
    with pytest.raises(UserError) as info:
        OutputGuard(outputs, []).prepare()
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"folder": ["o.report.json"], "parent_file": ["f"], "long_name": []}[case])


def test_guard_removes_the_folders_it_made(tmp_path):
    guard = OutputGuard({"model": tmp_path / "a" / "b" / "o.onnx"}, [])
    guard.prepare()
    assert (tmp_path / "a" / "b").is_dir()
    guard.abandon()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_guard_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write into"):
            OutputGuard({"model": folder / "o.onnx"}, []).prepare()
    finally:
        folder.chmod(0o755)
