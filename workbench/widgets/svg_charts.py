"""Small inline-SVG charts (line, heatmap, bars) for the views' HTML: drawn in Python so they need no front-end
code, render identically in the notebook, the served app and the static export, and carry their numbers as
`data-value` attributes and <title> tooltips (what the browser tests read back)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _num(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.6g}"


def _tick(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, xlabel: str, ylabel: str, log_y: bool = False,
               width: int = 360, height: int = 180, cls: str = "wb-line") -> str:
    """Lines through (x, y) points, one per series, with a legend; non-positive y dropped on a log axis."""
    pad_l, pad_b, pad_t, pad_r = 48, 28, 8, 8
    pts = {k: [(x, y) for x, y in v if math.isfinite(y) and (y > 0 or not log_y)] for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v] or [0.0, 1.0]
    ys = [(math.log10(y) if log_y else y) for v in pts.values() for _, y in v] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        v = math.log10(y) if log_y else y
        return height - pad_b - (v - y0) / (y1 - y0) * (height - pad_b - pad_t)

    parts = [f'<svg class="{cls}" width="{width}" height="{height}" '
             'style="font:10px sans-serif">',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#888"/>',
             f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="4" y="{pad_t + 8}">{html.escape(ylabel)}</text>',
             f'<text x="{pad_l - 4}" y="{height - pad_b}" text-anchor="end">{_tick(10**y0 if log_y else y0)}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{_tick(10**y1 if log_y else y1)}</text>',
             f'<text x="{pad_l}" y="{height - pad_b + 12}">{_tick(x0)}</text>',
             f'<text x="{width - pad_r}" y="{height - pad_b + 12}" text-anchor="end">{_tick(x1)}</text>']
    for i, (name, v) in enumerate(pts.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        parts.append(f'<polyline class="{cls}-series" data-series="{html.escape(name)}" fill="none" '
                     f'stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{colour}" data-x="{_num(x)}" '
                  f'data-value="{_num(y)}"><title>{html.escape(name)}: {_num(x)} → {_num(y)}</title></circle>'
                  for x, y in v]
        parts.append(f'<text x="{width - pad_r - 4}" y="{pad_t + 10 + 12 * i}" text-anchor="end" fill="{colour}">'
                     f"{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def heatmap(values: Sequence[Sequence[float]], *, rows: Sequence[str], cols: Sequence[str], cls: str = "wb-heat",
            cell: int = 26, fmt: str = "{:.2%}") -> str:
    """values[row][col] as coloured cells (white -> red by value / max; NaN grey), labels and tooltips."""
    finite = [v for r in values for v in r if math.isfinite(v)]
    top = max(finite) if finite and max(finite) > 0 else 1.0
    longest = max((len(c) for c in cols), default=0)
    lab_w, lab_h = 64, min(200, 12 + 5.5 * longest)  # rotated column labels need about 5.5 px per character
    width, height = lab_w + cell * len(cols) + int(0.5 * lab_h), lab_h + cell * len(rows)
    parts = [f'<svg class="{cls}" width="{width}" height="{height}" '
             'style="font:10px sans-serif">']
    for j, c in enumerate(cols):
        x = lab_w + j * cell + cell / 2
        parts.append(f'<text transform="translate({x},{lab_h - 4}) rotate(-60)">{html.escape(c)}</text>')
    for i, r in enumerate(rows):
        parts.append(f'<text x="{lab_w - 4}" y="{lab_h + i * cell + cell / 2 + 3}" text-anchor="end">'
                     f"{html.escape(r)}</text>")
        for j, c in enumerate(cols):
            v = values[i][j]
            if math.isfinite(v):
                t = max(0.0, min(1.0, v / top))
                fill = f"rgb(255,{int(255 - 200 * t)},{int(255 - 230 * t)})"
                label = fmt.format(v)
            else:
                fill, label = "#e4e4e4", "not simulated"
            parts.append(f'<rect class="{cls}-cell" data-row="{html.escape(r)}" data-col="{html.escape(c)}" '
                         f'data-value="{_num(v)}" x="{lab_w + j * cell}" y="{lab_h + i * cell}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{fill}"><title>{html.escape(r)} · {html.escape(c)}: {label}'
                         "</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def bars(values: Sequence[float], *, labels: Sequence[str], cls: str = "wb-bars", width: int = 360, height: int = 80,
         colour: str = "#1f77b4") -> str:
    """Vertical bars scaled to the largest |value|, one per label, with tooltips; with negative values the axis
    sits in the middle and those bars hang below it (drawn lighter)."""
    n = max(len(values), 1)
    finite = [v for v in values if math.isfinite(v)]
    top = max((abs(v) for v in finite), default=0.0) or 1.0
    signed = any(v < 0 for v in finite)
    axis = height / 2 if signed else height
    scale = (axis - 1) / top
    w = width / n
    parts = [f'<svg class="{cls}" width="{width}" height="{height}">']
    if signed:
        parts.append(f'<line x1="0" y1="{axis}" x2="{width}" y2="{axis}" stroke="#aaa"/>')
    for i, (v, lab) in enumerate(zip(values, labels, strict=True)):
        h = 0.0 if not math.isfinite(v) else abs(v) * scale
        y = axis - h if v >= 0 or not math.isfinite(v) else axis
        opacity = ' fill-opacity="0.55"' if v < 0 else ""
        parts.append(f'<rect class="{cls}-bar" data-label="{html.escape(lab)}" data-value="{_num(v)}" '
                     f'x="{i * w:.2f}" y="{y:.2f}" width="{max(w - 1, 0.5):.2f}" height="{h:.2f}" fill="{colour}"'
                     f"{opacity}><title>{html.escape(lab)}: {_num(v)}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)
