"""CPU throughput of evaluation: PQ on synthetic COCO-sized panoptic PNGs, and COCO box AP.

    python bench/bench_evaluate.py [--images 200] [--box-images 500] [--detections 100]

Synthetic panoptic set: 480 x 640 id maps with 4 stuff bands and ~16 things (rectangles and
ellipses) on them, some VOID and crowd; predictions are shifted, partly relabeled copies.
Box AP: 80 categories, ~7 objects per image, `--detections` jittered or random boxes per image.
Prints a markdown table; the timings exclude writing the synthetic files.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from detr_jax.evaluation.coco import boxes_to_coco_results, coco_evaluate
from detr_jax.evaluation.pq import pq_compute, pq_stats_from_arrays
from detr_jax.panoptic_format import id_to_rgb

HEIGHT, WIDTH = 480, 640
THINGS, STUFF = list(range(1, 81)), list(range(92, 145))


def synthetic_image(rng, n_things=16):
    """(gt ids, gt segments, pred ids, pred segments) of one structured random image."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    gt = np.zeros((HEIGHT, WIDTH), np.int64)
    segments = []
    bands = np.sort(rng.choice(np.arange(40, HEIGHT - 40), 3, replace=False))
    for k, (top, bottom) in enumerate(zip([0, *bands], [*bands, HEIGHT])):
        gt[top:bottom] = 1 + k
        segments.append({"id": 1 + k, "category_id": int(rng.choice(STUFF)), "iscrowd": 0})
    for k in range(n_things):
        cy, cx = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
        ry, rx = rng.integers(8, 90), rng.integers(8, 120)
        if rng.random() < 0.5:
            region = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        else:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        gt[region] = 100 + k
        segments.append({"id": 100 + k, "category_id": int(rng.choice(THINGS)),
                         "iscrowd": int(rng.random() < 0.05)})
    gt[rng.random((HEIGHT, WIDTH)) < 0.02] = 0  # scattered VOID
    gt[:, :8] = 0
    present = set(np.unique(gt).tolist())
    segments = [dict(s, area=int((gt == s["id"]).sum())) for s in segments if s["id"] in present]

    pred = np.roll(gt, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
    pred[rng.random((HEIGHT, WIDTH)) < 0.01] = 0
    category = {s["id"]: s["category_id"] for s in segments}
    pred_segments, relabeled = [], np.zeros_like(pred)
    for new_id, old_id in enumerate(np.unique(pred[pred > 0]).tolist(), start=5000):
        relabeled[pred == old_id] = new_id * 97  # ids spread over the colour range
        c = category[old_id] if rng.random() < 0.85 else int(rng.choice(THINGS))
        pred_segments.append({"id": new_id * 97, "category_id": c})
    return gt, segments, relabeled, pred_segments


def write_set(root, name, images, categories):
    (root / name).mkdir()
    annotations = []
    for image_id, (ids, segments) in enumerate(images):
        file_name = f"{image_id:012d}.png"
        Image.fromarray(id_to_rgb(ids)).save(root / name / file_name)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    (root / f"{name}.json").write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return root / f"{name}.json"


def bench_pq(n_images, seed=0):
    rng = np.random.default_rng(seed)
    images = [synthetic_image(rng) for _ in range(n_images)]
    categories = ([{"id": c, "isthing": 1} for c in THINGS] + [{"id": c, "isthing": 0} for c in STUFF])
    rows = []
    start = time.perf_counter()
    for image in images:
        pq_stats_from_arrays(*image, categories)
    seconds = time.perf_counter() - start
    rows.append(("PQ, in-memory id maps (`pq_stats_from_arrays`)", n_images, seconds))
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        gt = write_set(root, "gt", [(g, gs) for g, gs, _, _ in images], categories)
        pred = write_set(root, "pred", [(p, ps) for _, _, p, ps in images], categories)
        results = {}
        for workers in (0, 2):
            start = time.perf_counter()
            results[workers] = pq_compute(gt, pred, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append((f"PQ, PNG files (`pq_compute`, workers={workers})", n_images, seconds))
        assert results[0] == results[2]
    return rows, results[0]


def bench_box_ap(n_images, n_detections, seed=0):
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(n_images):
        images.append({"id": image_id, "height": HEIGHT, "width": WIDTH})
        n = int(rng.integers(1, 15))
        xy = rng.uniform(0, [WIDTH - 20, HEIGHT - 20], (n, 2))
        wh = rng.uniform(4, 300, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [WIDTH, HEIGHT])], 1)
        labels = rng.choice(THINGS, n)
        for box, label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
        jittered = np.repeat(boxes, 3, 0) + rng.normal(0, 8, (3 * n, 4))
        xy = rng.uniform(0, [WIDTH - 20, HEIGHT - 20], (n_detections - 3 * n, 2))
        spurious = np.concatenate([xy, xy + rng.uniform(4, 200, xy.shape)], 1)
        det_boxes = np.concatenate([jittered, spurious])[:n_detections]
        det_labels = np.concatenate([np.repeat(labels, 3), rng.choice(THINGS, len(spurious))])[:n_detections]
        detections += boxes_to_coco_results(image_id, det_boxes, rng.random(n_detections), det_labels)
    gt = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in THINGS]}
    start = time.perf_counter()
    stats = coco_evaluate(gt, detections)
    seconds = time.perf_counter() - start
    return [(f"box AP (`coco_evaluate`, {n_detections} detections/image)", n_images, seconds)], stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="panoptic images (480 x 640)")
    parser.add_argument("--box-images", type=int, default=500, help="images for box AP")
    parser.add_argument("--detections", type=int, default=100, help="detections per image for box AP")
    args = parser.parse_args(argv)
    pq_rows, pq = bench_pq(args.images)
    box_rows, box = bench_box_ap(args.box_images, args.detections)
    print(f"command: python bench/{pathlib.Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"CPU cores visible: {os.cpu_count()}; synthetic PQ {100 * pq['All']['pq']:.1f}, "
          f"box AP {100 * box['AP']:.1f}\n")
    print("| evaluation | images | seconds | images/s |")
    print("|---|---|---|---|")
    for name, n, seconds in pq_rows + box_rows:
        print(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.1f} |")


if __name__ == "__main__":
    main()
