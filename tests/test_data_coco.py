"""COCO readers: records follow the contract, read the official layout, and survive bad data."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from detr_jax.data import synthetic
from detr_jax.data.coco import BadSampleError, CocoDetection, CocoPanoptic, masks_to_boxes, rgb_to_id


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("coco"), num_train=3, num_val=2, image_size=(48, 64),
                              seed=1)


def test_detection_record_contract(root):
    ds = CocoDetection(root, "train2017")
    assert len(ds) == 3 and ds.num_classes == 4          # ids 1..3 kept as labels, 0 unused
    rec = ds[0]
    assert rec["image"].shape == (48, 64, 3) and rec["image"].dtype == np.uint8
    assert rec["image_id"] == 1 and tuple(rec["orig_size"]) == (48, 64)
    n = len(rec["labels"])
    assert rec["boxes"].shape == (n, 4) and rec["boxes"].dtype == np.float32
    assert rec["labels"].dtype == np.int32 and rec["iscrowd"].dtype == bool and rec["area"].shape == (n,)
    anns = json.loads((root / "annotations/instances_train2017.json").read_text())["annotations"]
    xywh = np.array([a["bbox"] for a in anns if a["image_id"] == 1], np.float32)
    np.testing.assert_array_equal(rec["boxes"], np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))


def test_panoptic_masks_are_the_png_segments_and_boxes_their_extent(root):
    ds = CocoPanoptic(root, "val2017")
    assert ds.num_classes == 7
    pan = json.loads((root / "annotations/panoptic_val2017.json").read_text())["annotations"][1]
    rec = ds[1]
    ids = rgb_to_id(np.asarray(Image.open(root / "annotations/panoptic_val2017" / pan["file_name"])))
    assert list(rec["segment_ids"]) == [s["id"] for s in pan["segments_info"]]
    for mask, seg_id, box, thing, label in zip(rec["masks"], rec["segment_ids"], rec["boxes"],
                                              rec["isthing"], rec["labels"]):
        np.testing.assert_array_equal(mask, ids == seg_id)
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])  # original convention
        assert thing == (label in synthetic.THING_IDS)
    assert rec["masks"].dtype == bool and rec["masks"].shape[1:] == (48, 64)


def test_detection_masks_equal_panoptic_thing_masks(root):
    det, pan = CocoDetection(root, "train2017", return_masks=True)[2], CocoPanoptic(root, "train2017")[2]
    things = pan["isthing"]
    np.testing.assert_array_equal(det["masks"], pan["masks"][things])
    np.testing.assert_array_equal(det["labels"], pan["labels"][things])


def test_explicit_paths_and_image_extension_differing_from_the_json(root, tmp_path):
    data = json.loads((root / "annotations/panoptic_train2017.json").read_text())
    for im in data["images"]:  # json says .png, the files are .jpg
        im["file_name"] = im["file_name"].replace(".jpg", ".png")
    ann_file = tmp_path / "pan.json"
    ann_file.write_text(json.dumps(data))
    explicit = CocoPanoptic(images_dir=root / "train2017", ann_file=ann_file,
                            png_dir=root / "annotations/panoptic_train2017")
    np.testing.assert_array_equal(explicit[0]["masks"], CocoPanoptic(root, "train2017")[0]["masks"])


def test_contiguous_labels_map_back_to_category_ids(root):
    ds = CocoPanoptic(root, "train2017", contiguous_labels=True)
    assert ds.num_classes == 6
    rec, ref = ds[0], CocoPanoptic(root, "train2017")[0]
    np.testing.assert_array_equal(ds.label_to_category_id[rec["labels"]], ref["labels"])


def test_masks_to_boxes_uses_last_pixel_index():
    masks = np.zeros((2, 5, 6), bool)
    masks[0, 1:3, 2:6] = True
    np.testing.assert_array_equal(masks_to_boxes(masks), [[2, 1, 5, 2], [0, 0, 0, 0]])


@pytest.fixture()
def messy(tmp_path):
    """A hand-written COCO detection set with every kind of bad data."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.png", "empty.jpg"):
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = [{"id": i + 1, "file_name": f, "height": 20, "width": 30}
              for i, f in enumerate(["a.jpg", "b.png", "empty.jpg", "corrupt.jpg", "missing.jpg"])]
    box = lambda image_id, bbox, **kw: dict({"image_id": image_id, "bbox": bbox, "category_id": 7,
                                            "area": 10.0, "iscrowd": 0}, **kw)
    anns = [box(1, [2, 3, 10, 5]), box(1, [0, 0, 30, 20], iscrowd=1), box(1, [25, 15, 20, 20]),
            box(1, [5, 5, 0, 4]), box(1, [-9, 2, 4, 4]), box(1, [5, 5, 3, 3], category_id=99),
            box(2, [1, 1, 2, 2]), box(4, [1, 1, 2, 2]), box(5, [1, 1, 2, 2])]
    for i, a in enumerate(anns):
        a["id"] = i + 1
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 7, "name": "x"}, {"id": 3, "name": "y"}]}))
    return dict(images_dir=tmp_path / "img", ann_file=ann_file)


def test_training_drops_crowd_degenerate_and_unknown_and_clips_boxes(messy, caplog):
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(**messy)
    assert "degenerate boxes" in caplog.text
    assert ds.stats["degenerate boxes"] == 2 and ds.stats["annotations of unknown category"] == 1
    rec = ds[0]
    np.testing.assert_array_equal(rec["boxes"], [[2, 3, 12, 8], [25, 15, 30, 20]])  # second one clipped
    assert not rec["iscrowd"].any() and list(rec["labels"]) == [7, 7]


def test_eval_keeps_crowd(messy):
    rec = CocoDetection(**messy, drop_crowd=False)[0]
    assert list(rec["iscrowd"]) == [False, True, False]


def test_images_without_objects_kept_or_skipped(messy):
    assert len(CocoDetection(**messy)) == 5
    skipping = CocoDetection(**messy, skip_empty=True)
    assert len(skipping) == 4 and skipping.stats["images without objects (skipped)"] == 1
    rec = CocoDetection(**messy)[2]
    assert rec["boxes"].shape == (0, 4) and rec["labels"].shape == (0,)


@pytest.mark.parametrize("index", [3, 4], ids=["corrupt", "missing"])
def test_unreadable_images_raise_bad_sample(messy, index):
    with pytest.raises(BadSampleError):
        CocoDetection(**messy)[index]
