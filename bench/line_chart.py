"""Line charts as PNG with Pillow alone (the project has no plotting dependency).

    panels = [Panel("box AP vs steps", "steps", "box AP", [Series("plain", xs, ys, color=0)])]
    draw_panels(panels, "convergence.png", columns=2)

A panel is one set of axes: "nice" ticks (1, 2, 5 x 10^k) from the data's range, a title, axis
labels and a legend in its top-left corner.  Series of one label share a color; `dashed` tells
seeds or stages apart.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (127, 127, 127))
PANEL_SIZE = (560, 380)
MARGIN = dict(left=64, right=16, top=34, bottom=48)


@dataclasses.dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: int = 0            # index into PALETTE
    dashed: bool = False


@dataclasses.dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: List[Series] = dataclasses.field(default_factory=list)


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.1e}"


def _dashed_line(draw: ImageDraw.ImageDraw, points: List[Tuple[float, float]], color, width: int) -> None:
    dash, gap = 7.0, 5.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        position = 0.0
        while position < length:
            end = min(position + dash, length)
            draw.line([(x0 + (x1 - x0) * position / length, y0 + (y1 - y0) * position / length),
                       (x0 + (x1 - x0) * end / length, y0 + (y1 - y0) * end / length)], fill=color, width=width)
            position = end + gap


def draw_panel(panel: Panel, size: Tuple[int, int] = PANEL_SIZE) -> Image.Image:
    """One panel as an RGB image of `size`."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    width, height = size
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = width - MARGIN["right"], height - MARGIN["bottom"]
    xs = [x for s in panel.series for x in s.xs]
    ys = [y for s in panel.series for y in s.ys]
    xticks = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
    yticks = nice_ticks(min(min(ys, default=0.0), 0.0), max(ys, default=1.0))

    def to_pixel(x: float, y: float) -> Tuple[float, float]:
        px = left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * (right - left)
        py = bottom - (y - yticks[0]) / (yticks[-1] - yticks[0]) * (bottom - top)
        return px, py

    for tick in xticks:
        px, _ = to_pixel(tick, yticks[0])
        draw.line([(px, top), (px, bottom)], fill=(232, 232, 232))
        draw.text((px, bottom + 4), _label(tick), fill="black", font=small, anchor="ma")
    for tick in yticks:
        _, py = to_pixel(xticks[0], tick)
        draw.line([(left, py), (right, py)], fill=(232, 232, 232))
        draw.text((left - 5, py), _label(tick), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((width / 2, 8), panel.title, fill="black", font=font, anchor="ma")
    draw.text(((left + right) / 2, height - 6), panel.xlabel, fill="black", font=small, anchor="md")
    ylabel = Image.new("RGB", (bottom - top, 16), "white")
    ImageDraw.Draw(ylabel).text(((bottom - top) / 2, 8), panel.ylabel, fill="black", font=small, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (4, top))

    for series in panel.series:
        color = PALETTE[series.color % len(PALETTE)]
        points = [to_pixel(x, y) for x, y in zip(series.xs, series.ys)]
        if len(points) > 1:
            if series.dashed:
                _dashed_line(draw, points, color, 2)
            else:
                draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)

    legend, seen = [], set()
    for series in panel.series:
        if series.label not in seen:
            seen.add(series.label)
            legend.append((series.label, PALETTE[series.color % len(PALETTE)]))
    for i, (label, color) in enumerate(legend):
        y = top + 8 + 15 * i
        draw.line([(left + 8, y), (left + 28, y)], fill=color, width=3)
        draw.text((left + 33, y), label, fill="black", font=small, anchor="lm")
    return image


def draw_panels(panels: Sequence[Panel], path, columns: int = 2, size: Tuple[int, int] = PANEL_SIZE) -> None:
    """The panels in a grid, `columns` wide, saved as a PNG at `path`."""
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (size[0] * min(columns, len(panels)), size[1] * rows), "white")
    for i, panel in enumerate(panels):
        sheet.paste(draw_panel(panel, size), ((i % columns) * size[0], (i // columns) * size[1]))
    sheet.save(path)
