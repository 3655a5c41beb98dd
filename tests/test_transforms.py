"""Augmentations keep boxes, masks and areas consistent, follow the original's sizes, and are seeded."""
import numpy as np
import pytest

from detr_jax.config import DataConfig
from detr_jax.data import synthetic, transforms as T
from detr_jax.data.preprocess import normalize, resized_size

TINY = DataConfig(short_side=48, max_size=80, train_scales=(32, 40, 48), train_max_size=80,
                  crop_resize_scales=(40, 48), crop_min_size=24, crop_max_size=40)


def rectangles_record(h=40, w=60):
    """Axis-aligned rectangles: their clipped box always equals the box of their mask."""
    rng = np.random.default_rng(0)
    boxes = np.array([[2, 3, 20, 30], [30, 0, 60, 12], [10, 15, 50, 40], [44, 30, 50, 36]], np.float32)
    masks = np.zeros((len(boxes), h, w), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        m[y0:y1, x0:x1] = True
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "image_id": 5,
            "orig_size": np.array([h, w], np.int32), "boxes": boxes, "labels": np.arange(4, dtype=np.int32),
            "iscrowd": np.zeros(4, bool), "area": masks.sum((1, 2)).astype(np.float32), "masks": masks}


def mask_box(mask):
    """Pixel-edge box xyxy of a mask (x_max + 1), the convention of COCO bboxes."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def shapes_record():
    """A synthetic image: circles, rotated squares and triangles with occlusion."""
    image, segments = synthetic.render(0, "train2017", 2, (64, 96))
    masks = np.stack([m for _, cat, m in segments if cat in synthetic.THING_IDS])
    return {"image": image, "boxes": np.stack([mask_box(m) for m in masks]), "masks": masks,
            "labels": np.ones(len(masks), np.int32), "area": masks.sum((1, 2)).astype(np.float32)}


def assert_boxes_match_masks(record, tol):
    assert len(record["boxes"]) == len(record["masks"]) == len(record["labels"])
    for box, mask in zip(record["boxes"], record["masks"]):
        np.testing.assert_allclose(mask_box(mask), box, atol=tol)


def test_hflip_mirrors_boxes_with_masks_exactly():
    rec = shapes_record()
    flipped = T.hflip(rec)
    assert_boxes_match_masks(flipped, 0)
    np.testing.assert_array_equal(flipped["image"], rec["image"][:, ::-1])
    np.testing.assert_array_equal(T.hflip(flipped)["boxes"], rec["boxes"])


@pytest.mark.parametrize("short_side,max_size", [(32, None), (100, None), (48, 60)])
def test_resize_follows_the_original_sizes_and_scales_boxes_with_masks(short_side, max_size):
    rec = shapes_record()
    out = T.resize(rec, short_side, max_size)
    assert out["image"].shape[:2] == resized_size(64, 96, short_side, max_size)
    assert out["masks"].shape[1:] == out["image"].shape[:2]
    assert_boxes_match_masks(out, 1.0)
    (h, w), (h0, w0) = out["image"].shape[:2], rec["image"].shape[:2]
    np.testing.assert_allclose(out["area"], rec["area"] * (h / h0) * (w / w0), rtol=1e-6)


def test_nearest_mask_resize_is_pytorchs_legacy_nearest():
    masks = np.array([[[True, False, True]]])
    np.testing.assert_array_equal(T.resize_masks_nearest(masks, (1, 5))[0, 0], [1, 1, 0, 0, 1])  # 0,0,1,1,2
    np.testing.assert_array_equal(T.resize_masks_nearest(masks, (2, 2))[0], [[1, 0], [1, 0]])    # 0,1


def test_crop_clips_boxes_drops_outside_objects_and_sets_box_area():
    rec = rectangles_record()
    out = T.crop(rec, top=10, left=5, height=20, width=40)
    assert out["image"].shape[:2] == (20, 40)
    assert_boxes_match_masks(out, 0)
    b = out["boxes"]
    np.testing.assert_allclose(out["area"], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    gone = T.crop(rec, top=0, left=0, height=10, width=25)
    assert list(gone["labels"]) == [0]           # only the first rectangle reaches this corner
    assert_boxes_match_masks(gone, 0)


@pytest.mark.parametrize("seed", range(16))
def test_train_transform_keeps_boxes_consistent_with_masks(seed):
    out = T.TrainTransform(TINY)(rectangles_record(), np.random.default_rng(seed))
    h, w = out["image_size"]
    assert out["image"].shape == (h, w, 3) and out["image"].dtype == np.float32
    assert min(h, w) in TINY.train_scales or max(h, w) <= TINY.train_max_size
    assert out["masks"].shape[1:] == (h, w)
    cx, cy, bw, bh = out["boxes"].T
    pixels = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
    # Nearest resizing moves a mask edge by < 1 pixel; the crop branch resizes twice, and the
    # last resize magnifies the first one's error by at most max(train_scales) / crop_min_size.
    tol = 1 + max(TINY.train_scales) / TINY.crop_min_size + 1e-4
    for box, mask in zip(pixels, out["masks"]):
        if mask.any():  # a box cropped to a sliver may lose its mask rows to nearest resizing
            np.testing.assert_allclose(mask_box(mask), box, atol=tol)
    assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()


def test_train_transform_is_a_function_of_the_generator():
    rec, tf = rectangles_record(), T.TrainTransform(TINY)
    a, b = tf(rec, np.random.default_rng(7)), tf(rec, np.random.default_rng(7))
    for key in ("image", "boxes", "masks", "labels", "area"):
        np.testing.assert_array_equal(a[key], b[key])
    sizes = {tuple(tf(rec, np.random.default_rng(s))["image_size"]) for s in range(30)}
    counts = {len(tf(rec, np.random.default_rng(s))["labels"]) for s in range(30)}
    assert len(sizes) > 2 and len(counts) > 1     # several scales; crops that drop objects


def test_random_size_crop_on_an_image_smaller_than_min_size():
    out = T.random_size_crop(rectangles_record(h=20, w=30), np.random.default_rng(0), 24, 40)
    assert out["image"].shape[0] == 20 and 24 <= out["image"].shape[1] <= 30


def test_eval_transform_resizes_normalizes_and_converts_boxes():
    rec = rectangles_record()
    out = T.EvalTransform(TINY)(rec)
    h, w = resized_size(40, 60, TINY.short_side, TINY.max_size)
    assert tuple(out["image_size"]) == (h, w) == out["image"].shape[:2]
    resized = T.resize(rec, TINY.short_side, TINY.max_size)
    np.testing.assert_array_equal(out["image"], normalize(resized["image"]))
    x0, y0, x1, y1 = resized["boxes"].T
    np.testing.assert_allclose(out["boxes"], np.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h,
                                                        (x1 - x0) / w, (y1 - y0) / h], 1), rtol=1e-6)
    assert out["image_id"] == 5 and tuple(out["orig_size"]) == (40, 60)
