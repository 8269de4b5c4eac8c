"""The MRECG figure: reconstruction loss along depth before and after merging (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from onnxq.core.files import atomic_write

log = logging.getLogger(__name__)


def plot_mrecg(report: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG of ``report["mrecg"]``-style data: loss before (first pass) and after (final pass)
    per block along depth, merged units shaded; for the proxy capacity, the capacity on a second axis.

    Args:
        report: the ``mrecg`` section of a quantization report.
        path: where the PNG goes (folders are created).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(report.get("blocks", []))
    xs = list(range(n))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), 4.0), dpi=110)
    try:
        for grp in (g for g in report.get("groups", []) if len(g) > 1):
            ax.axvspan(grp[0] - 0.4, grp[-1] + 0.4, color="tab:orange", alpha=0.15, lw=0)
        before, after = report.get("loss_before", []), report.get("loss_after", [])
        if any(v is not None for v in before):
            pts = [(x, v) for x, v in zip(xs, before) if v is not None]
            ax.plot(*zip(*pts), "o-", color="tab:blue", label="before (first pass, per block)")
        if any(v is not None for v in after):
            pts = [(x, v) for x, v in zip(xs, after) if v is not None]
            ax.plot(*zip(*pts), "s-", color="tab:red", label="after (merged units at their last block)")
        ax.set_yscale("log")
        ax.set_xlabel("block (original partition, along depth)")
        ax.set_ylabel("reconstruction loss (kept codes)")
        ax.set_xticks(xs)
        title = f"MRECG on {report.get('base', '?')}: k={report.get('k')}, capacity={report.get('capacity')}"
        ax.set_title(title + (" (shaded: merged)" if report.get("merges") else ""))
        if report.get("capacity") == "proxy":
            caps = [(x, c) for x, c in zip(xs, report.get("capacities", [])) if c is not None]
            if caps:
                ax2 = ax.twinx()
                ax2.plot(*zip(*caps), "^--", color="tab:gray", label="proxy capacity (ours)")
                ax2.set_yscale("log")
                ax2.set_ylabel("proxy capacity")
                ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    log.info("MRECG plot written to %s", path)
    return path
