"""Output, report, checkpoint and JSON paths: collisions with inputs, unwritable places, odd names."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import numpy_helper as nh

from tests.fuzz.harness import FAST, Case
from tests.fuzz.models import base_model, images, quantize_words, save, save_npz, write_base

Builder = Callable[[Path], list[str]]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
#: a learned method that finishes in a few seconds on the tiny model (dynamic batch: the fixed-batch model
#: cannot be reconstructed in mini-batches)
LEARNED = ["--method", "adaround", "--iters", "5", "--recon-samples", "8"]


def _base(d: Path, batch: int | str = 1) -> None:
    write_base(d, batch=batch)


def _out(out: str, extra: list[str] | None = None, prep: Callable[[Path], None] | None = None,
         batch: int | str = 1, data: str = "d.npz") -> Builder:
    def build(d: Path) -> list[str]:
        _base(d, batch)
        if prep:
            prep(d)
        return quantize_words(out=out, data=data, extra=extra)
    return build


def _mkdir(*names: str) -> Callable[[Path], None]:
    def prep(d: Path) -> None:
        for n in names:
            (d / n).mkdir(parents=True, exist_ok=True)
    return prep


def _file(name: str, text: str = "old\n") -> Callable[[Path], None]:
    def prep(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return prep


def _link(name: str, target: str) -> Callable[[Path], None]:
    return lambda d: os.symlink(target, d / name)


def _readonly(d: Path) -> None:
    (d / "ro").mkdir()
    (d / "ro" / "keep.txt").write_text("keep\n")
    os.chmod(d / "ro", 0o555)


def _model_named(name: str, out: str, extra: list[str] | None = None) -> Builder:
    """The input model saved under a name one of the output's companions will take."""
    def build(d: Path) -> list[str]:
        _base(d)
        shutil.copy(d / "m.onnx", d / name)
        return quantize_words(model=name, out=out, extra=extra)
    return build


def _config_named(name: str, out: str) -> Builder:
    def build(d: Path) -> list[str]:
        _base(d)
        (d / name).write_text('[rounding]\nmethod = "rtn"\n')
        return ["quantize", "m.onnx", "-o", out, "--calib", "d.npz", "--config", name]
    return build


def _bitplan_named(name: str, out: str, mixed: bool) -> Builder:
    def build(d: Path) -> list[str]:
        _base(d)
        (d / name).write_text(json.dumps({"layers": {"conv": 8, "fc": 8}}))
        extra = ["--bit-plan", name] + (["--mixed-precision", "--size-budget", "0.6"] if mixed else [])
        return quantize_words(out=out, extra=extra)
    return build


def _external_model(location: str, out: str) -> Builder:
    """The input model keeps W in ``location``; the output is ``out``."""
    def build(d: Path) -> list[str]:
        m = base_model()
        W = [i for i in m.graph.initializer if i.name == "W"][0]
        raw = nh.to_array(W).tobytes()
        W.ClearField("raw_data")
        W.ClearField("float_data")
        W.data_location = TensorProto.EXTERNAL
        e = W.external_data.add()
        e.key, e.value = "location", location
        save(m, d / "m.onnx")
        (d / location).write_bytes(raw)
        save_npz(d / "d.npz", x=images())
        (d / "notes.txt").write_text("notes\n")
        return quantize_words(out=out)
    return build


def _model_in(folder: str, out: str, extra: list[str], batch: int | str = "N", method: list[str] = LEARNED,
              prep: Callable[[Path], None] | None = None, data: str | None = None) -> Builder:
    """Model, data and notes.txt in ``folder`` (relative; '.' = the case folder), then ``extra``."""
    def build(d: Path) -> list[str]:
        f = d / folder
        f.mkdir(parents=True, exist_ok=True)
        save(base_model(batch=batch), f / "m.onnx")
        save_npz(f / "d.npz", x=images())
        (f / "notes.txt").write_text("notes next to the model\n")
        if prep:
            prep(d)
        model = os.path.normpath(os.path.join(folder, "m.onnx"))
        return ["quantize", model, "-o", out, "--calib", data or os.path.normpath(os.path.join(folder, "d.npz")),
                *method, *extra]
    return build


def _old_outputs(d: Path) -> None:
    (d / "outdir").mkdir(exist_ok=True)
    save(base_model(), d / "outdir" / "old.onnx")
    (d / "outdir" / "old.report.json").write_text("{}")


def _subfolder(d: Path) -> None:
    (d / "ck" / "sub").mkdir(parents=True)
    (d / "ck" / "sub" / "keep.txt").write_text("keep\n")
    (d / "ck" / "top.txt").write_text("top\n")


def _garbage_ckpt(d: Path) -> None:
    (d / "ck").mkdir()
    (d / "ck" / "state.json").write_text("{not json")
    (d / "ck" / "block_0001.npz").write_bytes(b"garbage")


def _foreign_ckpt(d: Path) -> None:
    (d / "ck").mkdir()
    (d / "ck" / "state.json").write_text(json.dumps({"model": "other", "blocks": {"0": "block_0001.npz"}}))
    save_npz(d / "ck" / "block_0001.npz", W=np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------------------------ validate
def _validate(json_to: str | None, quant: str = "q.onnx", data: str = "d.npz", real: bool = False,
              extra: list[str] | None = None, quant_bytes: bytes | None = None) -> Builder:
    def build(d: Path) -> list[str]:
        _base(d)
        if quant_bytes is not None:
            (d / quant).write_bytes(quant_bytes)
        elif real:
            import subprocess
            import sys

            from tests.fuzz.harness import _env
            subprocess.run([sys.executable, "-m", "onnxq", "quantize", "m.onnx", "-o", quant, "--calib", "d.npz",
                            *FAST], cwd=d, env=_env(), capture_output=True, timeout=120, check=True)
        elif quant != "m.onnx":
            shutil.copy(d / "m.onnx", d / quant)
        words = ["validate", "m.onnx", quant, "--data", data, *(extra or [])]
        return words + (["--json", json_to] if json_to is not None else [])
    return build


def _inspect(model_bytes: Callable[[], bytes], extra: list[str] | None = None, command: str = "inspect") -> Builder:
    def build(d: Path) -> list[str]:
        (d / "m.onnx").write_bytes(model_bytes())
        (d / "notes.txt").write_text("notes\n")
        return [command, "m.onnx", *(extra or [])]
    return build


def _model_bytes() -> bytes:
    return base_model().SerializeToString()


def _sigint_when_ckpt(d: Path) -> bool:
    return (d / "ck").is_dir() and any((d / "ck").iterdir())


LONG = 300 * "a"

CASES: list[Case] = [
    # output collides with the input model
    Case("path-out-is-model", _out("m.onnx"), fast=True),
    Case("path-out-is-model-dot-slash", _out("./m.onnx")),
    Case("path-out-is-model-dotdot", _out("sub/../m.onnx", prep=_mkdir("sub"))),
    Case("path-out-is-model-via-symlink", _out("link.onnx", prep=_link("link.onnx", "m.onnx"))),
    Case("path-model-via-symlink-out-is-target", lambda d: (_base(d), os.symlink("m.onnx", d / "l.onnx"),
                                                            quantize_words(model="l.onnx", out="m.onnx"))[2]),
    Case("path-out-is-model-absolute", lambda d: (_base(d), quantize_words(out=str(d / "m.onnx")))[1]),
    Case("path-out-is-data", _out("d.npz")),
    # companions of the output collide with inputs
    Case("path-model-named-out-report-json", _model_named("m2.report.json", "m2.onnx"), fast=True),
    Case("path-model-named-out-encodings-qnn", _model_named("m2.encodings", "m2.onnx", ["--target", "qnn"])),
    Case("path-model-named-out-encodings-ortcpu", _model_named("m2.encodings", "m2.onnx")),
    Case("path-model-named-out-onnx-data", _model_named("m2.onnx.data", "m2.onnx")),
    Case("path-model-named-out-mrecg-png", _model_named("m2.mrecg.png", "m2.onnx")),
    Case("path-config-is-out-report", _config_named("m2.report.json", "m2.onnx")),
    Case("path-config-is-out-encodings", _config_named("m2.encodings", "m2.onnx")),
    Case("path-bitplan-is-out-bitplan", _bitplan_named("m2.bitplan.json", "m2.onnx", mixed=False)),
    Case("path-bitplan-is-out-bitplan-mixed", _bitplan_named("m2.bitplan.json", "m2.onnx", mixed=True)),
    Case("path-out-is-external-data", _external_model("w.onnx", "w.onnx"), fast=True),
    Case("path-out-data-is-external-data", _external_model("out.onnx.data", "out.onnx")),
    Case("path-out-report-is-external-data", _external_model("out.report.json", "out.onnx")),
    # unwritable places
    Case("path-readonly-folder", _out("ro/out.onnx", prep=_readonly),
         skip="running as root: permissions are not enforced" if ROOT else None),
    Case("path-readonly-folder-new-sub", _out("ro/new/out.onnx", prep=_readonly),
         skip="running as root: permissions are not enforced" if ROOT else None),
    Case("path-parent-is-file", _out("notes.txt/out.onnx"), fast=True),
    Case("path-grandparent-is-file", _out("notes.txt/a/b/out.onnx")),
    Case("path-name-too-long", _out(LONG + ".onnx")),
    Case("path-folder-too-long", _out(LONG + "/out.onnx")),
    Case("path-name-255", _out("b" * 250 + ".onnx")),
    Case("path-report-is-folder", _out("out.onnx", prep=_mkdir("out.report.json")), fast=True),
    Case("path-encodings-is-folder-qnn", _out("out.onnx", ["--target", "qnn"], prep=_mkdir("out.encodings"))),
    Case("path-out-is-folder", _out("out.onnx", prep=_mkdir("out.onnx"))),
    Case("path-out-is-cwd", _out(".")),
    Case("path-out-empty-string", _out("")),
    Case("path-out-no-suffix", _out("out")),
    Case("path-out-upper-suffix", _out("out.ONNX")),
    Case("path-out-bak-suffix", _out("out.onnx.bak")),
    Case("path-out-hidden-dot-onnx", _out(".onnx")),
    Case("path-out-trailing-slash", _out("out.onnx/")),
    Case("path-out-dash", _out("-")),
    Case("path-out-dev-null", _out("/dev/null")),
    Case("path-out-new-nested", _out("new/sub/out.onnx")),
    Case("path-out-new-nested-failing-run", _out("new/sub/out.onnx", data="absent.npz")),
    Case("path-out-new-nested-bad-data", _out("new/sub/out.onnx", prep=_file("bad.npz", "junk"), data="bad.npz")),
    Case("path-out-dotdot", _out("sub/../out.onnx", prep=_mkdir("sub"))),
    Case("path-out-spaces-unicode", _out("my out ü.onnx")),
    Case("path-out-newline", _out("a\nb.onnx")),
    Case("path-out-double-suffix", _out("out.onnx.onnx")),
    Case("path-out-older-model", _out("out.onnx", prep=lambda d: save(base_model(opset=13), d / "out.onnx"))),
    Case("path-out-older-model-failing-run", _out("out.onnx", prep=_file("out.onnx", "old model"),
                                                  data="absent.npz")),
    Case("path-out-older-report-failing-run", _out("out.onnx", prep=_file("out.report.json", "{}"),
                                                   extra=["--set", "validation.min_cosine=1.5"])),
    Case("path-out-symlink-to-notes", _out("out.onnx", prep=_link("out.onnx", "notes.txt"))),
    Case("path-report-symlink-to-notes", _out("out.onnx", prep=_link("out.report.json", "notes.txt"))),
    Case("path-report-symlink-to-model", _out("out.onnx", prep=_link("out.report.json", "m.onnx"))),
    Case("path-out-dangling-symlink", _out("out.onnx", prep=_link("out.onnx", "nowhere/x.onnx"))),
    Case("path-out-tmp-name-taken", _out("out.onnx", prep=_file(".out.onnx.tmp"))),
    # checkpoint folders
    Case("ckpt-at-case-folder", _model_in(".", "out.onnx", ["--checkpoint-dir", "."])),
    Case("ckpt-at-model-folder", _model_in("inputs", "out.onnx", ["--checkpoint-dir", "inputs"]), fast=True),
    Case("ckpt-at-model-folder-keep", _model_in("inputs", "out.onnx", ["--checkpoint-dir", "inputs",
                                                                      "--keep-checkpoint"])),
    Case("ckpt-at-output-folder-with-older-model", _model_in(".", "outdir/out.onnx", ["--checkpoint-dir", "outdir"],
                                                             prep=_old_outputs)),
    Case("ckpt-with-subfolder", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"], prep=_subfolder)),
    Case("ckpt-with-subfolder-keep", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck", "--keep-checkpoint"],
                                               prep=_subfolder)),
    Case("ckpt-is-file", _model_in(".", "out.onnx", ["--checkpoint-dir", "notes.txt"]), fast=True),
    Case("ckpt-under-file", _model_in(".", "out.onnx", ["--checkpoint-dir", "notes.txt/ck"])),
    Case("ckpt-empty-string", _model_in(".", "out.onnx", ["--checkpoint-dir", ""])),
    Case("ckpt-garbage-state", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"], prep=_garbage_ckpt)),
    Case("ckpt-foreign-state", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"], prep=_foreign_ckpt)),
    Case("ckpt-new", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"])),
    Case("ckpt-new-keep", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck", "--keep-checkpoint"])),
    Case("ckpt-default-location", _model_in(".", "out.onnx", [])),
    Case("ckpt-default-keep", _model_in(".", "out.onnx", ["--keep-checkpoint"])),
    Case("ckpt-via-set", _model_in(".", "out.onnx", ["--set", 'engine.checkpoint_dir="."'])),
    Case("ckpt-with-rtn", _model_in(".", "out.onnx", ["--checkpoint-dir", "."], method=FAST)),
    Case("ckpt-fixed-batch-model", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"], batch=1)),
    Case("ckpt-failing-run-bad-data", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"],
                                                prep=_file("bad.npz", "junk"), data="bad.npz")),
    Case("ckpt-failing-validation", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck", "--set",
                                                                 "validation.min_cosine=1.5"])),
    Case("ckpt-adaquant", _model_in(".", "out.onnx", ["--checkpoint-dir", "."],
                                    method=["--method", "adaquant", "--iters", "5"])),
    Case("ckpt-brecq", _model_in(".", "out.onnx", ["--checkpoint-dir", "inputs"],
                                 method=["--method", "brecq", "--iters", "5"])),
    Case("ckpt-mrecg", _model_in(".", "out.onnx", ["--checkpoint-dir", "."],
                                 method=["--method", "mrecg", "--iters", "5"])),
    # interrupts
    Case("sigint-at-startup", _out("out.onnx"), sigint_after=0.3),
    Case("sigint-during-reconstruction", _model_in(".", "out.onnx", ["--checkpoint-dir", "ck"],
                                                   method=["--method", "adaround", "--iters", "20000"]),
         sigint_when=_sigint_when_ckpt, timeout=90),
    Case("sigint-after-2s-ckpt-at-model-folder", _model_in(".", "out.onnx", ["--checkpoint-dir", "."],
                                                           method=["--method", "adaround", "--iters", "20000"]),
         sigint_after=2.5, timeout=90),
    # validate
    Case("validate-json-is-float-model", _validate("m.onnx"), fast=True),
    Case("validate-json-is-quant-model", _validate("q.onnx")),
    Case("validate-json-is-data", _validate("d.npz")),
    Case("validate-json-is-notes", _validate("notes.txt")),
    Case("validate-json-parent-is-file", _validate("notes.txt/r.json")),
    Case("validate-json-is-folder", lambda d: (_mkdir("rdir")(d), _validate("rdir")(d))[1]),
    Case("validate-json-new-folder", _validate("new/r.json")),
    Case("validate-no-json", _validate(None)),
    Case("validate-real-quant", _validate("r.json", real=True)),
    Case("validate-real-quant-no-json", _validate(None, real=True)),
    Case("validate-same-model-twice", _validate(None, quant="m.onnx")),
    Case("validate-quant-named-float-report", _validate(None, quant="m.report.json")),
    Case("validate-missing-data", _validate("r.json", data="absent.npz")),
    Case("validate-no-data", lambda d: [w for w in _validate(None)(d) if w not in ("--data", "d.npz")]),
    Case("validate-garbage-quant", _validate("r.json", quant_bytes=b"\x00garbage")),
    Case("validate-other-model-quant", _validate("r.json", quant_bytes=onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["a"], ["b"])], "g",
                               [onnx.helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
                               [onnx.helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8).SerializeToString())),
    Case("validate-min-cosine-2", _validate("r.json", extra=["--min-cosine", "2"])),
    Case("validate-min-cosine-nan", _validate("r.json", extra=["--min-cosine", "nan"])),
    Case("validate-min-top1-neg", _validate("r.json", extra=["--min-top1", "-1"])),
    Case("validate-min-top1-text", _validate("r.json", extra=["--min-top1", "abc"])),
    Case("validate-runtime-qdq", _validate("r.json", extra=["--runtime", "qdq"])),
    Case("validate-batch-size-0", _validate("r.json", extra=["--batch-size", "0"])),
    # inspect / check
    Case("inspect-valid", _inspect(_model_bytes)),
    Case("inspect-json", _inspect(_model_bytes, ["--json"])),
    Case("inspect-truncated", _inspect(lambda: _model_bytes()[:100])),
    Case("inspect-max-chain-0", _inspect(_model_bytes, ["--max-chain", "0"])),
    Case("inspect-max-chain-neg", _inspect(_model_bytes, ["--max-chain", "-4"])),
    Case("check-float-model", _inspect(_model_bytes, ["--target", "ort-cpu"], command="check")),
    Case("check-unknown-target", _inspect(_model_bytes, ["--target", "gpu9000"], command="check")),
    Case("check-truncated", _inspect(lambda: _model_bytes()[:100], ["--target", "qnn"], command="check")),
    Case("check-json", _inspect(_model_bytes, ["--target", "tensorrt", "--json"], command="check")),
]
