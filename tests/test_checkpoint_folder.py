"""Checkpoint folders (onnxq.blocks.checkpoint): onnxq deletes only what it wrote there."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxq.blocks.checkpoint import MARKER, Checkpoint, check_folder
from onnxq.errors import UserError


def _run(folder, fp="fp") -> Checkpoint:
    ckpt = Checkpoint(folder, fp)
    ckpt.save(1, {"w": np.arange(3, dtype=np.float32)}, {"loss": 1.0})
    return ckpt


def test_a_new_folder_is_marked_and_removed_when_cleared(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = _run(folder)
    assert (folder / MARKER).is_file() and (folder / "block_0001.npz").is_file()
    ckpt.clear()
    assert not folder.exists()


def test_a_folder_of_user_files_is_refused_and_untouched(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"model")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files onnxq did not write"):
        Checkpoint(tmp_path, "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "notes.txt"]


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_folder(tmp_path / "f")


def test_clear_keeps_what_the_user_added_later(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = _run(folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    ckpt.clear()
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "notes.txt", "sub"])


def test_an_empty_folder_is_used(tmp_path):
    _run(tmp_path).clear()
    assert not tmp_path.exists()


def test_resume_and_corrupt_files(tmp_path):
    folder = tmp_path / "ckpt"
    _run(folder)
    again = Checkpoint(folder, "fp")
    assert again.done == [1] and again.load(1)["w"].tolist() == [0, 1, 2]
    (folder / "block_0001.npz").write_bytes(b"not a zip")
    assert Checkpoint(folder, "fp").done == []
    (folder / "state.json").write_text("{broken")
    assert Checkpoint(folder, "fp").done == []
    (folder / "state.json").write_text(json.dumps({"fingerprint": "fp", "done": ["x"]}))
    assert Checkpoint(folder, "fp").done == []
