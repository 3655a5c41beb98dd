"""Drawing predictions on images (PIL): panoptic segments, boxes, names and scores.

Images are uint8 RGB [H, W, 3]; boxes are (x0, y0, x1, y1) in pixels of that image (what
`postprocess.postprocess_boxes` returns for `orig_sizes`); `id_map` [H, W] and `segments_info`
are what `postprocess.postprocess_panoptic` returns.  Segments take the official COCO panoptic
colour of their category (instances of one thing category get slightly shifted shades so that
neighbours stay apart); boxes take the colour of their label.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detr_jax.labels import category_color, label_name

Color = Tuple[int, int, int]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _shade(color: Color, index: int) -> Color:
    """A stable variation of `color` for the index-th instance of a category (0: the colour itself)."""
    if index == 0:
        return color
    rng = np.random.default_rng(index)
    return tuple(int(v) for v in np.clip(np.asarray(color) + rng.integers(-40, 41, 3), 0, 255))


def _text_color(background: Color) -> Color:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _boundaries(id_map: np.ndarray, width: int) -> np.ndarray:
    """bool [H, W]: pixels next to a different segment id, thickened to about `width` pixels."""
    edge = np.zeros(id_map.shape, bool)
    edge[:, 1:] |= id_map[:, 1:] != id_map[:, :-1]
    edge[1:, :] |= id_map[1:, :] != id_map[:-1, :]
    for _ in range(max(0, width - 1)):
        grown = edge.copy()
        grown[:, 1:] |= edge[:, :-1]
        grown[1:, :] |= edge[:-1, :]
        edge = grown
    return edge


def _label(draw: ImageDraw.ImageDraw, xy: Tuple[float, float], text: str, color: Color,
           font: ImageFont.ImageFont, bounds: Tuple[int, int], placed: list, above: bool = True) -> None:
    """Text in a filled tag whose bottom-left (above=True) or centre is at `xy`, kept inside the
    image and moved down past the tags already `placed` (a list of rectangles it extends)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = (xy[0], xy[1] - h) if above else (xy[0] - w / 2, xy[1] - h / 2)
    x = min(max(0, x), bounds[0] - w)
    y = min(max(0, y), bounds[1] - h)
    for _ in range(len(placed)):
        hit = [r for r in placed if x < r[2] and r[0] < x + w and y < r[3] and r[1] < y + h]
        if not hit:
            break
        y = max(r[3] for r in hit) + 1
        if y + h > bounds[1]:  # no room below: give up on avoiding overlap
            y = bounds[1] - h
            break
    placed.append((x, y, x + w, y + h))
    draw.rectangle([x, y, x + w, y + h], fill=color + (220,))
    draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)


def draw_predictions(image: np.ndarray, boxes: Optional[np.ndarray] = None, labels: Optional[Sequence[int]] = None,
                     scores: Optional[Sequence[float]] = None, *, names: Optional[Sequence[str]] = None,
                     dataset: str = "coco", id_map: Optional[np.ndarray] = None,
                     segments_info: Optional[Sequence[Mapping]] = None, colors: Optional[Sequence[Color]] = None,
                     alpha: float = 0.5, font_size: Optional[int] = None,
                     categories: Optional[Mapping[int, Mapping]] = None) -> np.ndarray:
    """Draw panoptic segments (translucent fill + contours + stuff names) and labelled boxes.

    image: uint8 [H, W, 3].  boxes [N, 4] xyxy pixels with `labels` [N] (ids in `dataset`, "coco" or
    "coco_panoptic") or `names` [N], and optional `scores` [N] shown as "name 0.93".  `colors` [N]
    overrides the box colours.  id_map [H, W] with `segments_info` [{id, category_id, isthing}]:
    only ids listed there are drawn.  `categories` {id: {"name", "color"}} replaces the dataset's
    names and colours (e.g. a custom or synthetic dataset).  Returns a new uint8 [H, W, 3].
    """
    def color_of(cat: int) -> Color:
        return tuple(categories[cat]["color"]) if categories and cat in categories else category_color(cat)

    def name_of(cat: int, ds: str) -> str:
        return categories[cat]["name"] if categories and cat in categories else label_name(cat, ds)

    height, width = image.shape[:2]
    scale = min(height, width)
    font = _font(font_size or max(11, round(scale / 32)))
    line = max(2, round(scale / 250))
    out = image.astype(np.float32)
    tags = []
    if id_map is not None and segments_info:
        id_map = np.asarray(id_map)
        seen: dict = {}
        for seg in segments_info:
            inside = id_map == seg["id"]
            if not inside.any():
                continue
            cat = int(seg["category_id"])
            color = _shade(color_of(cat), seen.get(cat, 0))
            seen[cat] = seen.get(cat, 0) + 1
            out[inside] = (1 - alpha) * out[inside] + alpha * np.asarray(color, np.float32)
            if not seg.get("isthing", True):  # things are named by their boxes; stuff at its centre
                ys, xs = np.nonzero(inside)
                k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
                tags.append(((xs[k], ys[k]), name_of(cat, "coco_panoptic").replace("-merged", ""), color))
        known = np.isin(id_map, [s["id"] for s in segments_info])
        edge = _boundaries(np.where(known, id_map, -1), max(1, line // 2)) & known
        out[edge] = 0.4 * out[edge] + 0.6 * 255
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)).convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    placed: list = []
    for (x, y), text, color in tags:
        _label(draw, (x, y), text, color, font, (width, height), placed, above=False)
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            label = None if labels is None else int(labels[i])
            name = names[i] if names is not None else name_of(label, dataset) if label is not None else ""
            color = tuple(colors[i]) if colors is not None else color_of(label) if label is not None \
                else (255, 200, 0)
            draw.rectangle([x0, y0, x1, y1], outline=color + (255,), width=line)
            text = f"{name} {float(scores[i]):.2f}" if scores is not None else name
            if text:
                _label(draw, (x0, y0), text.strip(), color, font, (width, height), placed)
    return np.asarray(Image.alpha_composite(canvas, layer).convert("RGB"))


def side_by_side(left: np.ndarray, right: np.ndarray, titles: Optional[Tuple[str, str]] = None,
                 gap: int = 8, background: Color = (255, 255, 255)) -> np.ndarray:
    """Two uint8 [H, W, 3] images next to each other (the shorter one centred vertically), with
    optional titles above them.  Returns uint8 [H', W', 3]."""
    height = max(left.shape[0], right.shape[0])
    font = _font(max(12, round(height / 28)))
    title_h = 0
    if titles:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_h = max(probe.textbbox((0, 0), t, font=font)[3] for t in titles) + 2 * gap
    width = left.shape[1] + gap + right.shape[1]
    canvas = Image.new("RGB", (width, height + title_h), background)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for k, part in enumerate((left, right)):
        canvas.paste(Image.fromarray(part), (x, title_h + (height - part.shape[0]) // 2))
        if titles:
            text_w = draw.textlength(titles[k], font=font)
            draw.text((x + (part.shape[1] - text_w) / 2, gap), titles[k], fill=(0, 0, 0), font=font)
        x += part.shape[1] + gap
    return np.asarray(canvas)
