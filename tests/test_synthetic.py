"""The synthetic dataset is valid COCO and its three views (instances, PNG, boxes) agree."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_jax.data import synthetic
from detr_jax.panoptic_format import rgb_to_id

PARAMS = dict(num_train=4, num_val=2, image_size=(64, 80), seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), **PARAMS)


def _panoptic(root, split):
    return json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())


def _png_ids(root, split, file_name):
    return rgb_to_id(np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / file_name)))


@pytest.mark.parametrize("split,num", [("train2017", 4), ("val2017", 2)])
def test_layout_and_pycocotools_validate(root, split, num):
    coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == num and len(coco.getAnnIds()) >= num
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"circle", "square", "triangle"}
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(root / split / img["file_name"]) as im:
            assert im.size == (80, 64) and im.mode == "RGB"
    pan = _panoptic(root, split)
    assert {c["isthing"] for c in pan["categories"]} == {0, 1}
    assert all("color" in c for c in pan["categories"])
    assert [a["image_id"] for a in pan["annotations"]] == [im["id"] for im in pan["images"]]


def test_panoptic_segments_partition_the_image_and_match_their_info(root):
    pan = _panoptic(root, "train2017")
    for ann in pan["annotations"]:
        ids = _png_ids(root, "train2017", ann["file_name"])
        seg_ids = [s["id"] for s in ann["segments_info"]]
        assert len(set(seg_ids)) == len(seg_ids)
        assert set(np.unique(ids)) == set(seg_ids)          # no VOID, no unknown id
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert any(s["id"] > 65535 for a in pan["annotations"] for s in a["segments_info"])  # B channel used


def test_instance_masks_equal_panoptic_thing_masks_and_boxes_are_mask_boxes(root):
    coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    pan = {a["image_id"]: a for a in _panoptic(root, "train2017")["annotations"]}
    for image_id in coco.getImgIds():
        ids = _png_ids(root, "train2017", pan[image_id]["file_name"])
        things = [s for s in pan[image_id]["segments_info"] if s["category_id"] in synthetic.THING_IDS]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(things)
        for ann, seg in zip(anns, things):
            mask = coco.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(mask, ids == seg["id"])
            assert ann["category_id"] == seg["category_id"] and ann["iscrowd"] == 0
            assert ann["bbox"] == seg["bbox"] and ann["area"] == mask.sum()


def test_objects_are_large_enough_and_occlusion_leaves_them_visible():
    for i in range(8):
        image, segments = synthetic.render(0, "train2017", i, (128, 128))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        things = [m for _, cat, m in segments if cat in synthetic.THING_IDS]
        assert things and all(m.sum() >= 12 * 12 / 3 * synthetic.MIN_VISIBLE_FRACTION for m in things)
        np.testing.assert_array_equal(sum(m.astype(int) for _, _, m in segments), 1)


def test_squares_stand_on_a_side_and_triangles_point_up_unless_turned():
    square = synthetic._shape_mask(2, 32.0, 32.0, 20.0, 0.0, 64, 64)
    ys, xs = np.nonzero(square)
    assert square[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()            # fills its box
    assert ys.max() - ys.min() + 1 == xs.max() - xs.min() + 1 == 20
    triangle = synthetic._shape_mask(3, 32.0, 32.0, 30.0, 0.0, 64, 64)
    widths = triangle.sum(axis=1)[triangle.any(axis=1)]
    assert widths[0] < 5 and widths[-1] > 25 and np.all(np.diff(widths) >= 0)    # apex on top
    diamond = synthetic._shape_mask(2, 32.0, 32.0, 20.0, np.pi / 4, 64, 64)
    ys, xs = np.nonzero(diamond)
    assert not diamond[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()


def test_orientations_stay_within_max_rotation():
    upright = [synthetic.render(0, "train2017", i, (128, 128), max_rotation=0.0)[1] for i in range(6)]
    squares = [m for segments in upright for _, cat, m in segments if cat == 2]
    assert squares
    filled = [m[np.ix_(m.any(1), m.any(0))].mean() for m in squares]
    # unoccluded upright squares fill their box; occluded ones keep at least half of it
    assert max(filled) == 1.0 and min(filled) >= synthetic.MIN_VISIBLE_FRACTION


def test_deterministic_by_seed(root, tmp_path):
    again = synthetic.generate(tmp_path / "again", **PARAMS)
    other = synthetic.generate(tmp_path / "other", **dict(PARAMS, seed=4))
    name = "annotations/panoptic_train2017.json"
    assert (again / name).read_bytes() == (root / name).read_bytes()
    assert (other / name).read_bytes() != (root / name).read_bytes()
    png = "annotations/panoptic_val2017/000000000001.png"
    assert (again / png).read_bytes() == (root / png).read_bytes()


def test_worker_processes_write_the_same_files_as_one_process(tmp_path):
    params = dict(PARAMS, num_train=7)
    alone = synthetic.generate(tmp_path / "alone", workers=1, **params)
    # a fresh interpreter, where JAX has not started: the workers are forked
    script = ("import sys; from detr_jax.data import synthetic as s; s.PARALLEL_MIN_IMAGES = 4; s.SAMPLES_PER_TASK = 2; "
              f"assert s.can_fork(); s.generate(sys.argv[1], workers=2, **{params!r})")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "shared")], check=True)
    shared = tmp_path / "shared"
    files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
    assert len(files) == 2 * (7 + 2) + 5
    assert files == sorted(p.relative_to(shared) for p in shared.rglob("*") if p.is_file())
    for name in files:
        assert (alone / name).read_bytes() == (shared / name).read_bytes(), name


def test_a_process_running_jax_renders_alone_rather_than_fork_its_threads(tmp_path, monkeypatch):
    import concurrent.futures

    import jax

    jax.devices()      # JAX's backends started in this process
    assert not synthetic.can_fork()
    monkeypatch.setattr(synthetic, "PARALLEL_MIN_IMAGES", 4)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", None)   # any pool would fail
    synthetic.generate(tmp_path, workers=2, **dict(PARAMS, num_train=7))
    assert len(json.loads((tmp_path / "annotations/instances_train2017.json").read_text())["images"]) == 7


def test_ensure_synthetic_generates_only_when_parameters_change(tmp_path):
    small = dict(num_train=1, num_val=1, image_size=(32, 32))
    synthetic.ensure_synthetic(tmp_path, **small)
    manifest = tmp_path / synthetic.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    synthetic.ensure_synthetic(tmp_path, **small)
    assert manifest.stat().st_mtime_ns == stamp
    synthetic.ensure_synthetic(tmp_path, **dict(small, num_train=2))
    assert json.loads(manifest.read_text())["num_train"] == 2
    assert len(json.loads((tmp_path / "annotations/instances_train2017.json").read_text())["images"]) == 2
