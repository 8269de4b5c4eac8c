"""QuantResult: a quantized model, its report, and how both are written next to each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxq.core import graph as g
from onnxq.report.validate import ValidationReport, report_path, write_report
from onnxq.targets.profiles import get_target


def output_files(path: str | Path) -> dict[str, Path]:
    """Every file :meth:`QuantResult.save` may write for the model path ``path``, by role."""
    out = Path(path)
    return {"model": out, "external data": g.external_data_path(out), "report": report_path(out),
            "report page": out.with_suffix(".report.html"),
            "encodings": out.with_suffix(".encodings"), "bit plan": out.with_suffix(".bitplan.json"),
            "float plan": out.with_suffix(".floatplan.json"),
            "MRECG plot": out.with_suffix(".mrecg.png")}


@dataclass
class QuantResult:
    """The quantized model and the JSON-able report of the run."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    validation: ValidationReport | None = None
    bit_plan: Any = None  # the mixed-precision BitPlan (onnxq.mixed.plan), written as <stem>.bitplan.json
    float_plan: Any = None  # the accuracy target's FloatPlan (onnxq.fallback.plan), written as <stem>.floatplan.json

    def bit_plan_path(self, path: str | Path) -> Path:
        return output_files(path)["bit plan"]

    def save(self, path: str | Path) -> Path:
        """Write the model atomically, ``<stem>.report.json`` and its page ``<stem>.report.html`` next to it,
        the target's extra files (``<stem>.encodings`` for the qnn profiles, :mod:`onnxq.targets.encodings`), a mixed
        precision run's plan (``<stem>.bitplan.json``) and an accuracy-target run's (``<stem>.floatplan.json``)."""
        out = g.save_model(self.model, path, source=self.source)
        files = output_files(out)
        if self.bit_plan is not None:
            self.bit_plan.save(self.bit_plan_path(out))
        if self.float_plan is not None:
            self.float_plan.save(files["float plan"])
        target = (self.report.get("config") or {}).get("target")
        if target and "aimet_encodings" in get_target(target).exporters:
            from onnxq.targets.encodings import write_encodings

            write_encodings(self.model, files["encodings"])
        if self.report.get("mrecg"):  # the loss-along-depth figure, <stem>.mrecg.png
            from onnxq.report.mrecg_plot import plot_mrecg

            png = plot_mrecg(self.report["mrecg"], files["MRECG plot"])
            self.report["mrecg"]["plot"] = str(png)
        write_report(self.report, out)
        from onnxq.report.page import write_page

        write_page(self.report, files["report page"], out)
        return out
