"""The inline SVG charts carry the numbers they draw (data-value) and scale them as stated."""

from __future__ import annotations

import math
import re

from workbench.widgets.svg_charts import bars, heatmap, line_chart


def test_bars_are_signed_and_scaled() -> None:
    svg = bars([1.0, -0.5, float("nan")], labels=["a", "b", "c"], height=100)
    rects = re.findall(r'data-value="([^"]+)" x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)"', svg)
    assert [r[0] for r in rects] == ["1", "-0.5", "nan"]
    (_, y_a, h_a), (_, y_b, h_b), (_, _, h_c) = rects
    assert float(y_a) + float(h_a) == 50 and float(y_b) == 50  # up from, and down from, the middle axis
    assert math.isclose(float(h_b), float(h_a) / 2) and float(h_c) == 0


def test_heatmap_marks_unsimulated_cells_and_scales_to_max() -> None:
    svg = heatmap([[0.1, float("nan")], [0.2, 0.0]], rows=["r0", "r1"], cols=["c0", "c1"], cls="h")
    cells = re.findall(r'data-row="(\w+)" data-col="(\w+)" data-value="([^"]+)"[^>]*fill="([^"]+)"', svg)
    assert [c[2] for c in cells] == ["0.1", "nan", "0.2", "0"]
    assert cells[1][3] == "#e4e4e4" and cells[2][3] == "rgb(255,55,25)" and cells[3][3] == "rgb(255,255,255)"


def test_line_chart_drops_non_positive_points_on_a_log_axis() -> None:
    svg = line_chart({"kl": [(1, 1e-3), (2, 0.0), (4, 1e-5)]}, xlabel="r", ylabel="kl", log_y=True)
    assert re.findall(r'data-x="([^"]+)"', svg) == ["1", "4"]
