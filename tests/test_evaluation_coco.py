"""COCO box and mask AP around pycocotools, result conversion, and the report helpers."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.evaluation.coco import (COCO_METRICS, boxes_to_coco_results, coco_evaluate, encode_masks, evaluate,
                               format_results, masks_to_coco_results, panoptic_to_instances,
                               write_results_json)
from detr_jax.panoptic_format import id_to_rgb

SIZE = 200  # square images
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]  # ids with a gap, as COCO's
# Per image: (category_id, x0, y0, x1, y1); small (< 32^2), medium and large objects.
OBJECTS = {
    1: [(1, 10, 10, 30, 30), (3, 50, 40, 100, 90), (1, 60, 100, 190, 190)],
    2: [(3, 5, 150, 25, 170), (3, 100, 20, 150, 80)],
    3: [(1, 30, 30, 160, 150), (1, 170, 170, 190, 185)],
}

# One detection per image and category (AR1) recalls 2 of the 4 persons (images 1 and 3 hold two
# each) and 2 of the 3 cars; AR averages over the categories.
PERFECT = dict({name: 1.0 for name in COCO_METRICS}, AR1=(2 / 4 + 2 / 3) / 2)


def rectangle_masks(rectangles, size=SIZE):
    masks = np.zeros((len(rectangles), size, size), bool)
    for mask, (x0, y0, x1, y1) in zip(masks, rectangles):
        mask[y0:y1, x0:x1] = True
    return masks


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    """A tiny COCO instances file with RLE masks of the rectangles."""
    annotations = []
    for image_id, objects in OBJECTS.items():
        masks = rectangle_masks([o[1:] for o in objects])
        for (category_id, x0, y0, x1, y1), rle in zip(objects, encode_masks(masks)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "segmentation": rle, "iscrowd": 0})
    images = [{"id": i, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE} for i in OBJECTS]
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def perfect_box_results():
    results = []
    for image_id, objects in OBJECTS.items():
        objects = np.array(objects)
        results += boxes_to_coco_results(image_id, objects[:, 1:], np.ones(len(objects)), objects[:, 0])
    return results


def noisy_results(seed, masks=False):
    """Jittered copies of the objects with random scores and labels, plus spurious ones."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id, objects in OBJECTS.items():
        objects = np.array(objects + [(1, 0, 0, 40, 40), (3, 120, 120, 180, 160)], float)
        boxes = np.clip(objects[:, 1:] + rng.normal(0, 4, (len(objects), 4)), 0, SIZE)
        labels = np.where(rng.random(len(objects)) < 0.8, objects[:, 0], rng.choice([1, 3], len(objects)))
        scores = rng.random(len(objects))
        if masks:
            rectangles = np.round(boxes).astype(int).tolist()
            results += masks_to_coco_results(image_id, rectangle_masks(rectangles), scores, labels)
        else:
            results += boxes_to_coco_results(image_id, boxes, scores, labels)
    return results


def pycocotools_stats(gt_file, detections, iou_type, image_ids=None):
    """COCOeval run directly, as its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats.tolist()


def test_perfect_boxes_give_one(gt_file):
    stats = coco_evaluate(gt_file, perfect_box_results())
    assert list(stats) == list(COCO_METRICS)
    assert stats == pytest.approx(PERFECT)


@pytest.mark.parametrize("seed", range(3))
def test_box_ap_is_pycocotools_on_the_same_files(gt_file, seed):
    detections = noisy_results(seed)
    stats = coco_evaluate(gt_file, detections)
    assert 0.1 < stats["AP"] < 0.9
    assert list(stats.values()) == pycocotools_stats(gt_file, detections, "bbox")


def test_perfect_masks_give_one(gt_file):
    results = []
    for image_id, objects in OBJECTS.items():
        objects = np.array(objects)
        results += masks_to_coco_results(image_id, rectangle_masks(objects[:, 1:]), np.ones(len(objects)),
                                         objects[:, 0])
    assert coco_evaluate(gt_file, results, "segm") == pytest.approx(PERFECT)


def test_mask_ap_is_pycocotools_on_the_same_files(gt_file):
    detections = noisy_results(0, masks=True)
    stats = coco_evaluate(gt_file, detections, iou_type="segm")
    assert 0.1 < stats["AP"] < 0.9
    assert list(stats.values()) == pycocotools_stats(gt_file, detections, "segm")


def test_image_ids_restrict_the_evaluation(gt_file):
    detections = [d for d in noisy_results(1) if d["image_id"] != 3]
    stats = coco_evaluate(gt_file, detections, image_ids=[1, 2])
    assert list(stats.values()) == pycocotools_stats(gt_file, detections, "bbox", image_ids=[1, 2])
    assert stats != coco_evaluate(gt_file, detections)


def test_empty_detections_give_zeros_with_a_warning(gt_file):
    with pytest.warns(UserWarning, match="no detections"):
        assert coco_evaluate(gt_file, []) == {name: 0.0 for name in COCO_METRICS}


def test_inputs_are_left_unchanged_and_may_be_a_coco_a_dict_or_a_json_file(gt_file, tmp_path):
    detections = noisy_results(2)
    before = copy.deepcopy(detections)
    expected = coco_evaluate(gt_file, detections)
    assert detections == before
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    assert coco_evaluate(gt_file, tmp_path / "dets.json") == expected
    assert coco_evaluate(json.loads(gt_file.read_text()), detections) == expected
    with contextlib.redirect_stdout(io.StringIO()):
        assert coco_evaluate(COCO(str(gt_file)), detections) == expected
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt_file, detections, iou_type="keypoints")


def test_box_results_are_xywh_with_mapped_categories():
    results = boxes_to_coco_results(5, np.array([[10.0, 20.0, 50.0, 80.0]], np.float32), np.array([0.25]),
                                    np.array([2]), category_ids=[0, 7, 9])
    assert results == [{"image_id": 5, "category_id": 9, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.25}]
    assert boxes_to_coco_results(5, np.zeros((0, 4)), np.zeros(0), np.zeros(0)) == []


# pycocotools' decode (used here only to check) trips a numpy 2 deprecation of its own.
IGNORE_PYCOCOTOOLS_DECODE_WARNING = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@IGNORE_PYCOCOTOOLS_DECODE_WARNING
def test_masks_encode_to_json_ready_rles_that_decode_back():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) < 0.3
    rles = encode_masks(masks)
    assert all(isinstance(rle["counts"], str) for rle in rles)
    assert json.loads(json.dumps(rles)) == rles
    decoded = mask_util.decode([dict(rle, counts=rle["counts"].encode()) for rle in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1), masks)
    assert encode_masks(np.zeros((0, 17, 23), bool)) == []
    result = masks_to_coco_results(4, masks[:1], np.array([0.5]), np.array([3]))[0]
    assert set(result) == {"image_id", "category_id", "segmentation", "score"}


def write_panoptic_gt(root):
    """A COCO panoptic ground truth of two images: things (one crowd) and a stuff region."""
    categories = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
                  {"id": 7, "name": "sky", "isthing": 0}]
    ids = np.zeros((2, 40, 60), np.int64)
    ids[0, :20], ids[0, 25:, 5:20], ids[0, 25:, 30:50] = 11, 12, 13
    ids[1, 10:30, 10:30] = 21
    segments = [[(11, 7, 0), (12, 1, 0), (13, 3, 1)], [(21, 3, 0)]]
    (root / "panoptic").mkdir()
    annotations = []
    for image_id, (image_ids, image_segments) in enumerate(zip(ids, segments), start=1):
        Image.fromarray(id_to_rgb(image_ids)).save(root / "panoptic" / f"{image_id}.png")
        infos = []
        for segment_id, category_id, iscrowd in image_segments:
            ys, xs = np.nonzero(image_ids == segment_id)
            infos.append({"id": segment_id, "category_id": category_id, "iscrowd": iscrowd, "area": len(ys),
                          "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": infos})
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 40, "width": 60} for i in (1, 2)]
    path = root / "panoptic.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, ids


@IGNORE_PYCOCOTOOLS_DECODE_WARNING
def test_panoptic_ground_truth_to_instances(tmp_path):
    path, ids = write_panoptic_gt(tmp_path)
    instances = panoptic_to_instances(path)
    assert [c["id"] for c in instances["categories"]] == [1, 3]
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in instances["annotations"]] == [
        (1, 1, 0), (1, 3, 1), (2, 3, 0)]
    first = instances["annotations"][0]
    assert first["bbox"] == [5, 25, 15, 15] and first["area"] == 225
    rle = first["segmentation"]
    assert np.array_equal(mask_util.decode(dict(rle, counts=rle["counts"].encode())), ids[0] == 12)
    perfect = boxes_to_coco_results(1, np.array([[5, 25, 20, 40]]), np.array([0.9]), np.array([1]))
    perfect += boxes_to_coco_results(2, np.array([[10, 10, 30, 30]]), np.array([0.8]), np.array([3]))
    stats = coco_evaluate(instances, perfect)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_evaluate_format_and_write(gt_file, tmp_path):
    path, ids = write_panoptic_gt(tmp_path)
    prediction = json.loads(path.read_text())
    for annotation in prediction["annotations"]:
        annotation["segments_info"] = [s for s in annotation["segments_info"] if not s["iscrowd"]]
    ids[0][ids[0] == 13] = 0  # the crowd is not predicted
    (tmp_path / "pred").mkdir()
    for image_id, image_ids in enumerate(ids, start=1):
        Image.fromarray(id_to_rgb(image_ids)).save(tmp_path / "pred" / f"{image_id}.png")
    (tmp_path / "pred.json").write_text(json.dumps(prediction))

    results = evaluate(coco_gt=gt_file, box_results=perfect_box_results(), mask_results=noisy_results(0, True),
                       panoptic_gt_json=path, panoptic_pred_json=tmp_path / "pred.json", progress=False)
    assert results["bbox"]["AP"] == pytest.approx(1.0)
    assert results["panoptic"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}

    table = format_results(results)
    assert "| box | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in table
    assert f"| segm | {100 * results['segm']['AP']:.1f} |" in table
    assert "| PQ | SQ | RQ | PQth | SQth | RQth | PQst | SQst | RQst | AP |" in table
    assert "categories: 3 (2 things, 1 stuff)" in table

    write_results_json(dict(results, extra=np.float32(0.5)), tmp_path / "out" / "eval.json")
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["bbox"] == results["bbox"]
    assert written["panoptic"]["per_class"]["3"] == results["panoptic"]["per_class"][3]
    assert written["extra"] == 0.5

    with pytest.raises(ValueError, match="needs coco_gt"):
        evaluate(box_results=perfect_box_results())
    with pytest.raises(ValueError, match="needs both"):
        evaluate(panoptic_gt_json=path)
