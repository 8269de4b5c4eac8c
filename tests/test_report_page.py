"""The report page (<stem>.report.html): its measurements, its sections, self-contained, rendered by Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from onnxq.api import quantize
from onnxq.config import AccuracyTarget, Config, Validation
from onnxq.report.layers import OUTLIER_RATIO
from onnxq.report.page import render_page
from tests.test_accuracy_target import _attention, _data


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    """The attention model quantized with an accuracy target, saved (model, JSON, page, plan)."""
    folder = tmp_path_factory.mktemp("page")
    result = quantize(_attention(), _data(64, 0), Config(accuracy=AccuracyTarget(max_drop=0.5, metric="cosine")),
                      validation=_data(16, 5))
    return result, result.save(folder / "m.onnx")


def test_layers_follow_depth_and_mark_the_outlier_channels(target_run) -> None:
    result, _ = target_run
    layers = result.report["layers"]
    assert layers and all(r["tensor"] and r["range"][0] <= r["range"][1] for r in layers)
    by_name = {r["tensor"]: r for r in layers}
    # The residual stream x + o carries the LayerNorm's two 40x channels: one per-tensor scale cannot hold them.
    outliers = [r for r in layers if r["outlier"]]
    assert outliers and all(r["outlier_ratio"] > OUTLIER_RATIO for r in outliers), by_name
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 0 for r in layers)
    lat = result.report["latency"]
    assert lat["runs"] >= 3 and lat["float_ms"] > 0 and lat["quantized_ms"] > 0 and lat["batch"] == 8


def test_page_has_every_section_and_fetches_nothing(target_run) -> None:
    result, path = target_run
    page = path.with_suffix(".report.html")
    html = page.read_text()
    assert html == render_page(result.report, path)
    for section in ("Verdict", "Outputs", "Size and latency", "Kernels", "Error along depth", "Calibrated ranges",
                    "Accuracy target", "Ops left float"):
        assert f"<h2>{section}" in html, section
    assert "validation: OK" in html and "<svg" in html and 'class="outlier"' in html
    kept = result.report["accuracy_target"]["kept_float"]
    assert kept and all(k["node"] in html for k in kept)
    plan_latency = result.report["accuracy_target"]["latency"]
    assert plan_latency["planned_ms"] > 0 and plan_latency["runs"] >= 3 and "Speed of the plan" in html
    assert not re.search(r"(src|href)\s*=|<script|@import|url\(", html)  # one self-contained file


def test_no_details_without_validation_and_a_failed_verdict_is_red(tmp_path) -> None:
    result = quantize(_attention(), _data(32, 0), Config(validation=Validation(enabled=False)))
    assert "layers" not in result.report and "latency" not in result.report
    html = render_page(result.report, result.save(tmp_path / "m.onnx"))
    assert "Not validated" in html and "Error along depth" not in html
    failed = dict(result.report, validation={"ok": False, "failures": ["output y: cosine 0.5 < 0.95"],
                                             "errors": [], "n_samples": 2, "data": "x", "cpu": "c"})
    assert 'class="failed"' in render_page(failed, tmp_path / "m.onnx") and "cosine 0.5" in render_page(
        failed, tmp_path / "m.onnx")


@pytest.mark.slow
def test_chromium_renders_the_page(target_run, tmp_path) -> None:
    """Headless Chromium (Debian's ``chromium``) renders the page: the DOM holds every section and the
    screenshot is a real picture (look at it: ``tmp_path / page.png``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium: apt-get install chromium")
    _, path = target_run
    url = path.with_suffix(".report.html").resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "Error along depth" in dom and "<svg" in dom
    shot = tmp_path / "page.png"
    subprocess.run([*common, "--window-size=1100,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1100)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and plots, not a blank page
    reddish = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert reddish.any()  # the outlier points of the depth plot
