"""Inline SVG charts for the report page: no library, no script, no network; each point or bar carries a
``<title>`` that a browser shows on hover."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, PAD = 900, 260, 48


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def line_chart(values: Sequence[float | None], labels: Sequence[str], y_label: str,
               marks: Sequence[bool] | None = None) -> str:
    """A line over ``values`` (None: a gap) against their index; ``marks`` draws those points in red."""
    present = [v for v in values if v is not None]
    if not present:
        return "<p>No values to plot.</p>"
    lo, hi = min(present), max(present)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    n = max(len(values) - 1, 1)

    def x(i: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * i / n

    def y(v: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (v - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="{escape(y_label)}">',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>']
    for t in _ticks(lo, hi):
        parts.append(f'<text x="{PAD - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end">{t:.3g}</text>')
        parts.append(f'<line x1="{PAD}" y1="{y(t):.1f}" x2="{WIDTH - PAD}" y2="{y(t):.1f}" stroke="#eee"/>')
    parts.append(f'<text x="12" y="{PAD - 14}" font-size="12">{escape(y_label)}</text>')
    parts.append(f'<text x="{WIDTH - PAD}" y="{HEIGHT - 12}" font-size="12" text-anchor="end">depth (quantized '
                 'tensors in graph order)</text>')
    path, pen_down = [], False
    for i, v in enumerate(values):
        if v is None:
            pen_down = False
            continue
        path.append(f"{'L' if pen_down else 'M'}{x(i):.1f},{y(v):.1f}")
        pen_down = True
    parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="#1f6feb" stroke-width="1.5"/>')
    for i, v in enumerate(values):
        if v is None:
            continue
        red = bool(marks and marks[i])
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{4 if red else 2.5}" '
                     f'fill="{"#d1242f" if red else "#1f6feb"}"><title>{escape(labels[i])}: {v:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(values: Sequence[float], labels: Sequence[str], x_label: str, highlight: Sequence[bool]) -> str:
    """Horizontal bars, one per label (``highlight``: a darker bar)."""
    if not values:
        return "<p>No values to plot.</p>"
    top = max(max(values), 1e-12)
    row, left = 18, 320
    height = PAD + row * len(values)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" '
             f'aria-label="{escape(x_label)}">', f'<text x="{left}" y="16" font-size="12">{escape(x_label)}</text>']
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        y = 28 + i * row
        w = max(1.0, (WIDTH - left - 80) * max(v, 0.0) / top)
        short = label if len(label) <= 48 else "..." + label[-45:]
        parts.append(f'<text x="{left - 6}" y="{y + 12}" font-size="11" text-anchor="end">{escape(short)}</text>')
        fill = "#8250df" if highlight[i] else "#c8b6f0"
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 4}" fill="{fill}">'
                     f'<title>{escape(label)}: {v:.4g}</title></rect>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 12}" font-size="11">{v:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)
