"""A small synthetic dataset written in the real COCO formats (detection and panoptic).

The same readers, training and evaluation code run on it as on COCO:

    root/train2017/000000000001.jpg ...            images (HWC RGB)
    root/val2017/...
    root/annotations/instances_{split}.json        COCO detection: things only, bbox xywh,
                                                   area, iscrowd 0, segmentation as RLE
    root/annotations/panoptic_{split}.json         COCO panoptic: segments_info per image
    root/annotations/panoptic_{split}/*.png        segment id per pixel = R + 256 G + 65536 B
    root/synthetic_manifest.json                   the parameters (written last)

Content.  "Stuff" partitions the background into up to three horizontal bands with slightly
sloped borders: "sky" (blue vertical gradient) on top, an optional "wall" (striped) in the
middle and "grass" (noisy green) at the bottom.  "Things" (circle, square, triangle, of random
size >= `min_size`, color and position) are painted on top in z-order, later ones occluding
earlier ones; an object is only placed if every earlier object keeps at least half of its area
visible.  Squares stand on a side and triangles point up, each turned by a random angle of at
most `max_rotation` degrees either way (180: any orientation).  The bound matters for a demo
trained in minutes: on one-shape images, the demo's detector reached box AP 37.3 after 300 steps
with upright shapes and 13.9 with shapes in any orientation.  Masks, boxes and areas always
describe the VISIBLE part, so the instance masks, the boxes (COCO: [x, y, w, h] with
w = x_max - x_min + 1) and the panoptic PNG agree exactly.  There is no VOID: every pixel
belongs to exactly one segment.

Everything is a function of `seed`, the split and the image index (image i of a split is the
same whatever `num_train` / `num_val`).
"""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

GENERATOR_VERSION = 2   # 2: orientations bounded by max_rotation (1: any orientation)
MANIFEST = "synthetic_manifest.json"
SPLITS = ("train2017", "val2017")

# (id, name, isthing, color); stuff ids follow the thing ids, as in COCO panoptic.
CATEGORIES: Tuple[Tuple[int, str, int, Tuple[int, int, int]], ...] = (
    (1, "circle", 1, (220, 20, 60)),
    (2, "square", 1, (0, 0, 142)),
    (3, "triangle", 1, (250, 170, 30)),
    (4, "sky", 0, (70, 130, 180)),
    (5, "grass", 0, (107, 142, 35)),
    (6, "wall", 0, (102, 102, 156)),
)
THING_IDS = tuple(c[0] for c in CATEGORIES if c[2])
SKY, GRASS, WALL = 4, 5, 6
MIN_VISIBLE_FRACTION = 0.5   # an earlier object must keep this much of its area visible
MAX_ROTATION = 15.0          # degrees either way from upright, by default
UPRIGHT = {2: np.pi / 4, 3: -np.pi / 2}   # first corner's angle: square on a side, triangle pointing up


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 99, index])


def _stuff_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """int [H, W] stuff category per pixel: sky above, optional wall, grass below."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    top = rng.uniform(0.2, 0.45) * h
    has_wall = rng.random() < 0.6
    bottom = rng.uniform(top + 0.2 * h, 0.75 * h) if has_wall else top
    border1 = top + rng.uniform(-0.1, 0.1) * (xs - w / 2)
    border2 = bottom + rng.uniform(-0.1, 0.1) * (xs - w / 2)
    out = np.full((h, w), GRASS, np.int32)
    out[ys < border2] = WALL
    out[ys < border1] = SKY
    return out


def _stuff_texture(rng: np.random.Generator, stuff: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in 0..255: the texture of each stuff class where it lies."""
    h, w = stuff.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    t = (ys / max(h - 1, 1))[..., None]                        # sky: vertical gradient
    sky = (1 - t) * np.array([90, 150, 235]) + t * np.array([190, 220, 250])
    grass = np.array([60, 140, 50]) + rng.normal(0, 18, (h, w, 1)) * np.array([0.6, 1.0, 0.5])
    period = rng.integers(6, 11)
    stripes = ((ys + xs * rng.uniform(-0.3, 0.3)) // (period / 2)) % 2
    wall = np.where(stripes[..., None] > 0, np.array([150, 110, 90]), np.array([200, 180, 160]))
    for cat, tex in ((SKY, sky), (GRASS, grass), (WALL, wall)):
        img[stuff == cat] = np.broadcast_to(tex, (h, w, 3))[stuff == cat]
    return img


def _circumradius(cat: int, size: float) -> float:
    """Radius of the circle through the corners: `size` is the diameter or the side length."""
    return size / 2 if cat == 1 else size / np.sqrt(2) if cat == 2 else size / np.sqrt(3)


def _shape_mask(cat: int, cx: float, cy: float, size: float, angle: float, h: int, w: int) -> np.ndarray:
    """bool [H, W]: pixel centers inside the circle / square / triangle turned by `angle` radians
    from upright (the square on a side, the triangle pointing up; image y points down)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    radius = _circumradius(cat, size)
    if cat == 1:
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    n = 4 if cat == 2 else 3
    angles = angle + UPRIGHT[cat] + 2 * np.pi * np.arange(n) / n
    px, py = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    inside = np.ones((h, w), bool)
    for k in range(n):  # corners in increasing angle: inside = same side of every edge
        x0, y0, x1, y1 = px[k], py[k], px[(k + 1) % n], py[(k + 1) % n]
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


def _things(rng: np.random.Generator, h: int, w: int, max_objects: int, min_size: int, max_rotation: float):
    """[(category, color, full mask)] in z-order, bottom first; every earlier object stays visible."""
    max_size = max(min_size, int(0.5 * min(h, w)))
    objects: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _try in range(20):
            cat = int(rng.choice(THING_IDS))
            size = rng.uniform(min_size, max_size)
            r = min(_circumradius(cat, size), min(h, w) / 2)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            angle = np.deg2rad(max_rotation) * rng.uniform(-1, 1)
            mask = _shape_mask(cat, cx, cy, size, angle, h, w)
            if mask.sum() < min_size * min_size / 3:
                continue
            covered = mask.copy()
            ok = True
            for _, _, earlier in reversed(objects):  # visible part of each earlier object
                ok &= (earlier & ~covered).sum() >= MIN_VISIBLE_FRACTION * earlier.sum()
                covered |= earlier
            if ok:
                color = rng.integers(0, 256, 3)
                color[rng.integers(3)] = rng.integers(200, 256)  # saturated, never grey-dark
                objects.append((cat, color, mask))
                break
    return objects


def _bbox(mask: np.ndarray) -> List[float]:
    """COCO [x, y, w, h] of a non-empty mask, w = x_max - x_min + 1."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def render(seed: int, split: str, index: int, image_size: Tuple[int, int], max_objects: int = 5,
           min_size: int = 12, max_rotation: float = MAX_ROTATION):
    """One sample: (image uint8 [H, W, 3], [(segment id, category id, visible bool [H, W])]).

    Stuff segments come first, then things bottom to top.  The masks partition the image.
    """
    rng = _rng(seed, split, index)
    h, w = image_size
    stuff = _stuff_map(rng, h, w)
    image = _stuff_texture(rng, stuff)
    objects = _things(rng, h, w, max_objects, min_size, max_rotation)
    owner = np.full((h, w), -1, np.int64)          # index of the visible object per pixel
    for k, (_, color, mask) in enumerate(objects):
        shade = 1.0 + rng.normal(0, 0.04, (h, w, 1))
        image[mask] = (color * shade)[mask]
        owner[mask] = k
    ids: List[int] = []
    while len(ids) < len(objects) + 3:  # distinct random ids over all 24 bits of the PNG
        candidate = int(rng.integers(1, 1 << 24))
        ids += [] if candidate in ids else [candidate]
    segments = []
    for cat in (SKY, WALL, GRASS):
        visible = (stuff == cat) & (owner < 0)
        if visible.any():
            segments.append((int(ids[len(segments)]), cat, visible))
    for k, (cat, _, _) in enumerate(objects):
        segments.append((int(ids[len(segments)]), cat, owner == k))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), segments


def _categories(panoptic: bool) -> List[Dict]:
    out = []
    for cid, name, isthing, color in CATEGORIES:
        if panoptic:
            out.append({"id": cid, "name": name, "supercategory": "shape" if isthing else "background",
                        "isthing": isthing, "color": list(color)})
        elif isthing:
            out.append({"id": cid, "name": name, "supercategory": "shape"})
    return out


def _write_sample(root: pathlib.Path, split: str, i: int, sizes: List[Tuple[int, int]], seed: int,
                  max_objects: int, min_size: int, max_rotation: float, image_format: str):
    """Render image i of `split`, write its image and panoptic PNG; return its COCO records: (image,
    instance annotations without their ids, panoptic annotation)."""
    image_id = i + 1
    size_rng = _rng(seed + 1, split, i)
    h, w = sizes[int(size_rng.integers(len(sizes)))]
    image, segments = render(seed, split, i, (h, w), max_objects, min_size, max_rotation)
    stem = f"{image_id:012d}"
    file_name = f"{stem}.{image_format}"
    options = {"quality": 95} if image_format == "jpg" else {}
    Image.fromarray(image).save(root / split / file_name, **options)
    id_map = np.zeros((h, w), np.uint32)
    segments_info, instances = [], []
    for seg_id, cat, mask in segments:
        id_map[mask] = seg_id
        bbox = _bbox(mask)
        area = int(mask.sum())
        segments_info.append({"id": seg_id, "category_id": cat, "iscrowd": 0, "bbox": bbox, "area": area})
        if cat in THING_IDS:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            instances.append({"image_id": image_id, "category_id": cat, "bbox": bbox, "area": float(area),
                              "iscrowd": 0, "segmentation": rle})
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "annotations" / f"panoptic_{split}" / f"{stem}.png")
    return ({"id": image_id, "file_name": file_name, "height": h, "width": w}, instances,
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})


def _write_samples(args) -> list:
    """`_write_sample` of each index of a chunk (a worker process's task)."""
    root, split, indices, rest = args
    return [_write_sample(root, split, i, *rest) for i in indices]


PARALLEL_MIN_IMAGES = 512   # splits this large are rendered by several processes ...
SAMPLES_PER_TASK = 100      # ... in tasks of this many images


def can_fork() -> bool:
    """Whether worker processes can be forked safely: the platform forks, and this process has not
    started JAX's backends (whose threads a fork would copy mid-flight); else one process renders."""
    import multiprocessing

    bridge = sys.modules.get("jax._src.xla_bridge")
    return "fork" in multiprocessing.get_all_start_methods() and not getattr(bridge, "_backends", None)


def _write_split(root: pathlib.Path, split: str, num: int, sizes: List[Tuple[int, int]], seed: int,
                 max_objects: int, min_size: int, max_rotation: float, image_format: str,
                 workers: int = 1) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
    rest = (sizes, seed, max_objects, min_size, max_rotation, image_format)
    chunks = [range(start, min(start + SAMPLES_PER_TASK, num)) for start in range(0, num, SAMPLES_PER_TASK)]
    tasks = [(root, split, chunk, rest) for chunk in chunks]
    if workers > 1 and num >= PARALLEL_MIN_IMAGES and can_fork():
        import concurrent.futures
        import multiprocessing

        # forked workers (a script calling this needs no `__main__` guard) run numpy, PIL and
        # pycocotools only
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            samples = [sample for part in pool.map(_write_samples, tasks) for sample in part]
    else:
        samples = [sample for task in tasks for sample in _write_samples(task)]
    images = [image for image, _, _ in samples]
    instances = [{"id": k + 1, **annotation}
                 for k, annotation in enumerate(a for _, annotations, _ in samples for a in annotations)]
    panoptic = [entry for _, _, entry in samples]
    info = {"description": f"detr-jax synthetic shapes (seed {seed})", "version": str(GENERATOR_VERSION)}
    for name, annotations, pan in (("instances", instances, False), ("panoptic", panoptic, True)):
        with open(root / "annotations" / f"{name}_{split}.json", "w") as f:
            json.dump({"info": info, "licenses": [], "images": images, "annotations": annotations,
                       "categories": _categories(pan)}, f)


def generate(root: Union[str, pathlib.Path], num_train: int = 256, num_val: int = 64,
             image_size: Union[Tuple[int, int], Sequence[Tuple[int, int]]] = (128, 128), seed: int = 0,
             max_objects: int = 5, min_size: int = 12, max_rotation: float = MAX_ROTATION,
             image_format: str = "jpg", workers: Optional[int] = None) -> pathlib.Path:
    """Write the dataset under `root` (layout in the module docstring) and return `root`.

    `image_size` is (height, width), or a list of them to draw one per image.  `image_format` is
    "jpg" or "png".  Files are overwritten; the manifest is written last.  `workers`: processes
    that render a split of `PARALLEL_MIN_IMAGES` images or more (default: the CPU count; one where
    `can_fork` is False); the files are the same whatever their number.
    """
    root = pathlib.Path(root)
    sizes = [tuple(image_size)] if np.ndim(image_size) == 1 else [tuple(s) for s in image_size]
    if min(min(s) for s in sizes) < 2 * min_size:
        raise ValueError(f"image sizes {sizes} too small for objects of min_size {min_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    for split, num in zip(SPLITS, (num_train, num_val)):
        _write_split(root, split, num, sizes, seed, max_objects, min_size, max_rotation, image_format,
                     workers or os.cpu_count() or 1)
    manifest = _manifest(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                         max_objects=max_objects, min_size=min_size, max_rotation=max_rotation,
                         image_format=image_format)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return root


def _manifest(**kwargs) -> Dict:
    """The full parameter set (defaults of `generate` filled in), as stored in the manifest."""
    bound = inspect.signature(generate).bind(None, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("root")
    params.pop("workers")   # how, not what
    params["image_size"] = np.asarray(params["image_size"]).tolist()
    return {"generator_version": GENERATOR_VERSION, **params}


def ensure_synthetic(root: Union[str, pathlib.Path], **kwargs) -> pathlib.Path:
    """Generate the dataset under `root` unless its manifest already records these parameters.

    Takes the keyword arguments of `generate`.  Returns `root`.
    """
    root = pathlib.Path(root)
    wanted = _manifest(**kwargs)
    try:
        if json.loads((root / MANIFEST).read_text()) == wanted:
            return root
    except (OSError, ValueError):
        pass
    return generate(root, **kwargs)
