"""The configuration: nested frozen sections, TOML files, presets, layered overrides, the CLI's flags
checked against the dataclasses, one resolution, and the deprecated flat QuantConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq.cli import main
from onnxq.config import BRECQ, GPTQ, AdaQuant, Config, MRECGMerge, QDrop, RoundToNearest, Weights
from onnxq.config.files import load_toml, merge, parse_override, to_toml, tomllib
from onnxq.config.flags import FLAGS, config_paths, flag_layer
from onnxq.config.presets import preset, preset_description, preset_names
from onnxq.errors import UserError
from onnxq.targets.profiles import resolve_config

MODELS = Path(__file__).resolve().parents[1] / "models"


def _round_trip(config: Config) -> Config:
    return Config.from_dict(tomllib.loads(to_toml(config)))


@pytest.mark.parametrize("config", [
    Config(),
    Config(weights=Weights(bits=4, symmetric=False, range_method="mse", first_last_bits=None,
                           bit_plan=(("conv.1", 8), ("fc", 2))), rounding=BRECQ.long(mrecg=MRECGMerge(k=2))),
    Config(target="tensorrt", scale="float", exclude=("Softmax",), rounding=QDrop.paper(drop_prob=0.3)),
    Config(rounding=AdaQuant.fast(mode="parallel", iters=7)),
], ids=["default", "w4-brecq-mrecg", "trt-qdrop", "adaquant"])
def test_toml_round_trip(config: Config) -> None:
    assert _round_trip(config) == config
    resolved = resolve_config(config)
    assert _round_trip(resolved) == resolved


def test_every_preset_loads_resolves_and_is_documented() -> None:
    names = preset_names()
    assert {"w8a8", "w8a8-tensorrt", "npu-pow2", "w4a8", "w4a8-fast", "w4a4", "w2a4"} <= set(names)
    for name in names:
        config = Config.from_preset(name)
        assert resolve_config(config) == resolve_config(resolve_config(config))  # resolving twice: no change
        assert "docs/benchmarks.md" in preset_description(name)
    w4a8 = Config.from_preset("w4a8")
    assert (w4a8.weights.bits, w4a8.weights.symmetric, w4a8.weights.range_method) == (4, False, "mse")
    assert isinstance(w4a8.rounding, BRECQ) and w4a8.rounding == BRECQ.long()
    w4a4 = Config.from_preset("w4a4")
    assert isinstance(w4a4.rounding, QDrop) and w4a4.rounding.iters == 600 and w4a4.activations.bits == 4
    with pytest.raises(UserError, match="unknown preset 'w3a3'"):
        preset("w3a3")


def test_layers_merge_in_order_and_a_new_method_replaces_the_rounding_table(caplog) -> None:
    base = preset("w4a8")
    assert merge(base, {"rounding": {"iters": 600}})["rounding"] == {"method": "brecq", "schedule": "long",
                                                                      "iters": 600}
    with caplog.at_level(logging.WARNING, logger="onnxq.config.files"):
        switched = merge(merge(base, {"rounding": {"iters": 600}}), {"rounding": {"method": "qdrop"}})
    assert switched["rounding"] == {"method": "qdrop", "schedule": "long"}
    assert [r.getMessage() for r in caplog.records] == [
        "rounding.method=qdrop replaces the brecq settings below it: iters=600 not carried over (set them "
        "again, e.g. --set rounding.iters=600, to keep them)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxq.config.files"):
        kept = merge(merge(base, {"rounding": {"iters": 600}}), {"rounding": {"method": "qdrop", "iters": 900}})
        merge(base, {"rounding": {"method": "qdrop"}})  # the preset names no setting beyond its schedule
    assert kept["rounding"] == {"method": "qdrop", "schedule": "long", "iters": 900} and not caplog.records
    # rtn and gptq take no schedule and none of QDrop's settings: nothing to keep, nothing to warn about
    with caplog.at_level(logging.WARNING, logger="onnxq.config.files"):
        for method, kind in (("rtn", RoundToNearest), ("gptq", GPTQ)):
            plain = merge(merge(preset("w2a4"), {"rounding": {"iters": 600}}), {"rounding": {"method": method}})
            assert plain["rounding"] == {"method": method}
            assert isinstance(Config.from_dict(plain).rounding, kind)
    assert not caplog.records
    assert Config.from_dict(switched).rounding == QDrop.long()
    assert parse_override("rounding.iters=600") == (["rounding", "iters"], 600)
    assert parse_override("weights.symmetric=false") == (["weights", "symmetric"], False)
    assert parse_override("target=tensorrt") == (["target"], "tensorrt")
    assert parse_override('exclude=["Softmax", "conv1"]') == (["exclude"], ["Softmax", "conv1"])
    with pytest.raises(UserError, match="SECTION.FIELD=VALUE"):
        parse_override("rounding.iters")


@pytest.mark.parametrize("values,fragment", [
    ({"weight": {"bits": 4}}, "unknown setting 'weight'"),
    ({"weights": {"bit": 4}}, "unknown setting weights.bit"),
    ({"weights": {"bits": 3}}, "weights.bits=3"),
    ({"rounding": {"method": "gptq", "iters": 5}}, "gptq has no setting 'iters'"),
    ({"rounding": {"method": "qdrop", "order": "two_pass"}}, "a setting of brecq"),
    ({"rounding": {"method": "rtn", "iters": 5}}, "rtn has no settings"),
    ({"rounding": {"method": "adaquant", "mrecg": {}}}, "MRECG merges blocks of brecq or qdrop"),
    ({"seed": 2**64}, "seed="),
    ({"mixed_precision": {"size_budget": 0.5}}, "needs mixed precision on"),
    ({"mixed_precision": {"enabled": True}}, "exactly one of"),
    ({"engine": {"device": "tpu"}}, "torch device"),
], ids=lambda v: str(v)[:30])
def test_bad_settings_are_one_line_errors(values: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=None) as err:
        Config.from_dict(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_auto_values_are_resolved_once_and_depend_only_on_stated_settings() -> None:
    w8 = resolve_config(Config(weights=Weights(bits=4), rounding=BRECQ.fast()))
    assert (w8.rounding.act_iters, w8.rounding.order, w8.rounding.weight_inputs) == (0, "two_pass", "weights_only")
    w4a4 = resolve_config(Config(weights=Weights(bits=4), activations=onnxq.Activations(bits=4),
                                 rounding=BRECQ.fast()))
    assert (w4a4.rounding.act_iters, w4a4.rounding.order, w4a4.rounding.weight_inputs) == (75, "interleaved",
                                                                                         "quantized")
    paper = resolve_config(Config(rounding=BRECQ.paper(mrecg=MRECGMerge())))
    assert paper.rounding.act_iters == 5000 and paper.rounding.mrecg.iters == "per_unit"
    assert resolve_config(Config(rounding=QDrop.fast(mrecg=MRECGMerge()))).rounding.mrecg.iters == "per_block"
    npu = resolve_config(Config(target="npu-pow2"))
    assert (npu.scale, npu.activations.dtype, npu.activations.bits) == ("pow2", "int8", 8)
    with pytest.raises(UserError, match="target tensorrt does not allow scale='pow2'|does not allow activations"):
        resolve_config(Config(target="tensorrt", activations=onnxq.Activations(dtype="uint8")))


def test_every_flag_sets_an_existing_field_and_every_choice_comes_from_the_dataclasses() -> None:
    paths = config_paths()
    assert {"weights.bits", "rounding.iters", "rounding.mrecg.k", "engine.device", "validation.enabled"} <= paths
    for flag in FLAGS:
        assert flag.path in paths, flag.name
        sample = flag.choices[0] if flag.choices else (True if flag.switch else None)
        if sample is not None:
            for path in flag.settings(sample):
                assert path in paths, (flag.name, path)
    assert flag_layer({"--method": "mrecg", "--mrecg-k": 2}) == {"rounding": {"method": "brecq", "mrecg": {"k": 2}}}
    assert flag_layer({"--weights": "int2"})["weights"] == {"bits": 2, "int2_grid": "uniform", "symmetric": False}
    with pytest.raises(UserError, match="--mrecg-base applies to --method mrecg"):
        flag_layer({"--method": "qdrop", "--mrecg-base": "brecq"})


def test_cli_help_is_short_and_help_all_is_complete(capsys) -> None:
    assert main(["quantize", "--help"]) == 0
    short = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  -")]
    assert len(short) <= 20
    assert main(["quantize", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert all(flag.name in full for flag in FLAGS)


def test_cli_layers_preset_file_flags_and_set(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run.toml"
    run.write_text('[rounding]\nmethod = "brecq"\nschedule = "long"\niters = 800\n\n[calibration]\nmethod = "mse"\n')
    assert main(["quantize", "--preset", "w4a4", "--config", str(run), "--iters", "700",
                 "--set", "rounding.round_lr=0.02", "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    # w4a4 preset (qdrop) < file (brecq, replaces the rounding table) < --iters < --set
    assert printed["rounding"]["method"] == "brecq" and printed["rounding"]["iters"] == 700
    assert printed["rounding"]["round_lr"] == 0.02 and printed["calibration"]["method"] == "mse"
    assert printed["activations"]["bits"] == 4 and printed["rounding"]["order"] == "interleaved"
    bad = tmp_path / "bad.toml"
    bad.write_text("[weights\nbits = 4\n")
    assert main(["quantize", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid TOML" in err
    assert main(["quantize", "--set", "weights.bits=5", "--print-config"]) == 2
    assert "weights.bits=5" in capsys.readouterr().err
    assert load_toml(run)["rounding"]["iters"] == 800


def test_cli_preset_quantizes_and_the_report_records_both_configs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODELS / "tiny_mlp.onnx"), "-o", str(out), "--calib", _mlp_calib(tmp_path),
                 "--preset", "w8a8", "--no-validate"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config_requested"]["activations"]["dtype"] is None
    assert report["config"]["activations"]["dtype"] == "uint8"
    assert report["config"]["rounding"]["method"] == "gptq" and report["weight_rounding"]["rounding"] == "gptq"


def _mlp_calib(tmp: Path) -> str:
    path = tmp / "mlp.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    return str(path)


def test_quant_config_is_deprecated_and_converts_exactly() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = onnxq.QuantConfig(weight_bits=4, method="mrecg", mrecg_base="qdrop", recon_iters=50,
                                   weight_symmetric=False, weight_method="mse", activation_bits=4)
    assert any(issubclass(w.category, DeprecationWarning) and "onnxq.Config" in str(w.message) for w in caught)
    config = legacy.to_config()
    assert config.rounding == QDrop.fast(iters=50, mrecg=MRECGMerge())
    assert config.method == "mrecg" and config.activations.bits == 4 and not config.weights.symmetric
    # 0.1's defaults meant the target's choices, and round-to-nearest (Config's default is now GPTQ)
    assert onnxq.QuantConfig().to_config() == Config(rounding=RoundToNearest())
    assert onnxq.QuantConfig(method="adaquant", schedule="paper").to_config().rounding == AdaQuant.paper()
    assert isinstance(onnxq.QuantConfig().to_config().rounding, RoundToNearest)


def test_configs_are_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weights.bits = 4  # type: ignore[misc]


def test_range_methods_follow_the_scale_kind_unless_set() -> None:
    """Unset range methods resolve by scale kind (minmax for float scales, mse for power-of-two ones,
    whose ceil-rounded min/max scale is up to twice too coarse); a method the user set is kept."""
    def methods(config: Config) -> tuple[str | None, str | None]:
        resolved = resolve_config(config)
        return resolved.weights.range_method, resolved.calibration.method

    assert methods(Config()) == ("minmax", "minmax")
    assert methods(Config(scale="pow2")) == ("mse", "mse")
    assert methods(Config(target="npu-pow2")) == ("mse", "mse")
    assert methods(Config(scale="pow2", weights=onnxq.Weights(range_method="minmax"),
                          calibration=onnxq.Calibration(method="percentile"))) == ("minmax", "percentile")
