"""PQ as panopticapi defines it, on tiny hand-made panoptic PNG + JSON sets and random id maps."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from detr_jax.evaluation.pq import PQStat, merge_pq_stats, pq_average, pq_compute, pq_stats_from_arrays
from detr_jax.panoptic_format import id_to_rgb, read_id_map, rgb_to_id

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]


def seg(segment_id, category_id, iscrowd=0):
    return {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd}


def write_panoptic(root, name, images, categories=CATEGORIES):
    """Writes `root/name.json` and `root/name/*.png` in the COCO panoptic format.

    images: (image_id, ids [H, W], segments_info); gt areas are filled in from the pixels."""
    folder = root / name
    folder.mkdir()
    annotations = []
    for image_id, ids, segments in images:
        file_name = f"{image_id:012d}.png"
        Image.fromarray(id_to_rgb(ids)).save(folder / file_name)
        segments = [dict(s, area=s.get("area", int((ids == s["id"]).sum()))) for s in segments]
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    images_info = [{"id": i, "file_name": f"{i:012d}.jpg", "height": ids.shape[0], "width": ids.shape[1]}
                   for i, ids, _ in images]
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images_info, "annotations": annotations, "categories": categories}))
    return path


def evaluate_one(tmp_path, gt_ids, gt_segments, pred_ids, pred_segments, **kwargs):
    gt = write_panoptic(tmp_path, "gt", [(1, gt_ids, gt_segments)])
    pred = write_panoptic(tmp_path, "pred", [(1, pred_ids, pred_segments)])
    return pq_compute(gt, pred, progress=False, **kwargs)


def stats_of(gt_ids, gt_segments, pred_ids, pred_segments):
    return pq_stats_from_arrays(gt_ids, gt_segments, pred_ids, pred_segments, CATEGORIES)


def test_ids_round_trip_through_rgb_png(tmp_path):
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2 ** 24 - 1, 123456]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "ids.png")
    assert np.array_equal(read_id_map(tmp_path / "ids.png"), ids)
    assert rgb_to_id(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 256 * 2 + 65536 * 3


def test_perfect_prediction_gives_one(tmp_path):
    ids = np.zeros((12, 16), np.int64)
    ids[:6, :8], ids[6:, :8], ids[:, 8:] = 7, 9, 300
    segments = [seg(7, 1), seg(9, 2), seg(300, 3)]
    results = evaluate_one(tmp_path, ids, segments, ids, segments)
    for split, n in (("All", 3), ("Things", 2), ("Stuff", 1)):
        assert results[split] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert results["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # never seen, not averaged


def hand_case():
    """10 x 10 image. Ground truth: A person (20 px), E sky (30 px), B person (20 px), D car (30 px).
    Prediction: P1 person overlapping A with IoU 15/25 = 0.6, P3 sky inside E (IoU 25/30),
    nothing on B (a FN), P2 person exactly on the car D (a person FP and a car FN)."""
    gt = np.zeros((10, 10), np.int64)
    gt[:5, :4], gt[:5, 4:], gt[5:, :4], gt[5:, 4:] = 1, 5, 2, 4
    pred = np.zeros((10, 10), np.int64)
    pred[:5, 1:5], pred[:5, 5:], pred[5:, 4:] = 11, 13, 12
    return (gt, [seg(1, 1), seg(5, 3), seg(2, 1), seg(4, 2)],
            pred, [seg(11, 1), seg(13, 3), seg(12, 1)])


def test_hand_computed_tp_fp_fn(tmp_path):
    results = evaluate_one(tmp_path, *hand_case())
    person = dict(pq=0.6 / (1 + 0.5 + 0.5), sq=0.6, rq=1 / (1 + 0.5 + 0.5))
    car = dict(pq=0.0, sq=0.0, rq=0.0)  # one FN only
    sky = dict(pq=25 / 30, sq=25 / 30, rq=1.0)
    expected_class = {1: person, 2: car, 3: sky}
    for category_id, expected in expected_class.items():
        assert results["per_class"][category_id] == pytest.approx(expected)
    assert results["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    for split, members in (("All", [1, 2, 3]), ("Things", [1, 2]), ("Stuff", [3])):
        for key in ("pq", "sq", "rq"):
            mean = sum(expected_class[c][key] for c in members) / len(members)
            assert results[split][key] == pytest.approx(mean), (split, key)
        assert results[split]["n"] == len(members)


def test_hand_case_stats_from_arrays():
    stats = stats_of(*hand_case())
    assert stats[1] == PQStat(iou=pytest.approx(0.6), tp=1, fp=1, fn=1)
    assert stats[2] == PQStat(iou=0.0, tp=0, fp=0, fn=1)
    assert stats[3] == PQStat(iou=pytest.approx(25 / 30), tp=1, fp=0, fn=0)


def boundary_case(pred_start):
    """Person gt on columns 0-5 (30 px), sky gt on 6-9; a person prediction on columns
    pred_start..pred_start+5 (30 px)."""
    gt = np.zeros((5, 10), np.int64)
    gt[:, :6], gt[:, 6:] = 1, 2
    pred = np.zeros((5, 10), np.int64)
    pred[:, pred_start:pred_start + 6] = 10
    return gt, [seg(1, 1), seg(2, 3)], pred, [seg(10, 1)]


def test_iou_of_exactly_half_is_not_a_match():
    stats = stats_of(*boundary_case(pred_start=2))  # 20 / (30 + 30 - 20) = 0.5
    assert stats[1] == PQStat(iou=0.0, tp=0, fp=1, fn=1)
    stats = stats_of(*boundary_case(pred_start=1))  # 25 / 35 > 0.5
    assert stats[1] == PQStat(iou=pytest.approx(25 / 35), tp=1, fp=0, fn=0)


def test_union_leaves_out_the_predictions_void_part():
    gt = np.zeros((4, 10), np.int64)
    gt[:, :5] = 1  # 20 px person; columns 5-9 VOID
    pred = np.full((4, 10), 10)  # 40 px person: 20 on the person, 20 on VOID
    stats = stats_of(gt, [seg(1, 1)], pred, [seg(10, 1)])
    assert stats[1] == PQStat(iou=1.0, tp=1, fp=0, fn=0)  # 20 / (40 + 20 - 20 - 20)


@pytest.mark.parametrize("void_pixels, is_fp", [(11, False), (10, True), (3, True)])
def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive(void_pixels, is_fp):
    gt = np.full((1, 20), 2)  # a car
    gt[0, :void_pixels] = 0
    pred = np.full((1, 20), 10)  # a person over it all: unmatched
    stats = stats_of(gt, [seg(2, 2)], pred, [seg(10, 1)])
    assert stats.get(1, PQStat()).fp == int(is_fp)
    assert stats[2].fn == 1


def test_crowd_regions():
    gt = np.zeros((1, 40), np.int64)
    gt[0, :20], gt[0, 20:] = 1, 2  # a person crowd, then sky
    gt_segments = [seg(1, 1, iscrowd=1), seg(2, 3)]

    # Person mostly in the person crowd: not FP; the crowd itself is never a FN.
    pred = np.full((1, 40), 0)
    pred[0, 5:25] = 10  # 15 of 20 in the crowd
    stats = stats_of(gt, gt_segments, pred, [seg(10, 1)])
    assert stats.get(1, PQStat()) == PQStat()
    assert stats[3] == PQStat(fn=1)

    # A car there is FP: only a crowd of the prediction's own category discounts it.
    stats = stats_of(gt, gt_segments, pred, [seg(10, 2)])
    assert stats[2] == PQStat(fp=1)

    # A prediction equal to the crowd is no TP (crowds are not matched) nor a FP.
    pred = np.zeros((1, 40), np.int64)
    pred[0, :20] = 10
    assert stats_of(gt, gt_segments, pred, [seg(10, 1)]).get(1, PQStat()) == PQStat()

    # VOID and crowd add up, and must be more than half of the prediction.
    gt[0, 30:] = 0
    pred = np.zeros((1, 40), np.int64)
    pred[0, 15:35] = 10  # 5 in the crowd, 10 on sky, 5 on VOID: 10/20 is not more than half
    assert stats_of(gt, gt_segments, pred, [seg(10, 1)])[1] == PQStat(fp=1)
    pred[0, 14] = 10  # 6 in the crowd now: 11/21 > 0.5
    assert stats_of(gt, gt_segments, pred, [seg(10, 1)]).get(1, PQStat()) == PQStat()


def test_only_the_last_crowd_segment_of_a_category_discounts_as_in_panopticapi():
    gt = np.zeros((1, 30), np.int64)
    gt[0, :10], gt[0, 10:20], gt[0, 20:] = 1, 2, 3
    gt_segments = [seg(1, 1, iscrowd=1), seg(2, 1, iscrowd=1), seg(3, 3)]
    pred = np.zeros((1, 30), np.int64)
    pred[0, :10] = 10  # inside the first person crowd
    assert stats_of(gt, gt_segments, pred, [seg(10, 1)])[1] == PQStat(fp=1)
    pred = np.zeros((1, 30), np.int64)
    pred[0, 10:20] = 10  # inside the last one
    assert stats_of(gt, gt_segments, pred, [seg(10, 1)]).get(1, PQStat()) == PQStat()


def test_ground_truth_areas_come_from_the_json_as_in_panopticapi(tmp_path):
    gt = np.zeros((1, 20), np.int64)
    gt[0, :10], gt[0, 10:] = 1, 2
    pred = gt * 10
    # A JSON area of 12 for a 10-pixel segment: IoU 10 / 12.
    results = evaluate_one(tmp_path, gt, [dict(seg(1, 1), area=12), seg(2, 3)], pred, [seg(10, 1), seg(20, 3)])
    assert results["per_class"][1]["sq"] == pytest.approx(10 / 12)
    assert stats_of(gt, [dict(seg(1, 1), area=12)], pred, [seg(10, 1), seg(20, 3)])[1].iou == 1.0


def test_unknown_segment_ids_and_categories_are_named(tmp_path):
    gt, gt_segments, pred, pred_segments = hand_case()
    with pytest.raises(KeyError, match=r"image with ID 7 segment IDs \[12\] are present in the PNG"):
        pq_stats_from_arrays(gt, gt_segments, pred, pred_segments[:2], CATEGORIES, image_id=7)
    with pytest.raises(KeyError, match=r"image with ID 7 segment IDs \[99\] are present in the JSON"):
        pq_stats_from_arrays(gt, gt_segments, pred, pred_segments + [seg(99, 1)], CATEGORIES, image_id=7)
    with pytest.raises(KeyError, match="segment with ID 13 has unknown category_id 42"):
        pq_stats_from_arrays(gt, gt_segments, pred, [pred_segments[0], seg(13, 42), pred_segments[2]],
                             CATEGORIES, image_id=7)
    with pytest.raises(ValueError, match="differ in shape"):
        pq_stats_from_arrays(gt, gt_segments, pred[:5], pred_segments, CATEGORIES)
    with pytest.raises(ValueError, match="segment id 0 is reserved for VOID"):
        pq_stats_from_arrays(gt, gt_segments + [seg(0, 1)], pred, pred_segments, CATEGORIES)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\*\*24\)"):
        pq_stats_from_arrays(gt, gt_segments, pred + 2 ** 24, pred_segments, CATEGORIES)
    with pytest.raises(KeyError, match="image with ID 1 segment IDs \\[12\\]"):
        evaluate_one(tmp_path, gt, gt_segments, pred, pred_segments[:2], strict=True)


def test_missing_prediction_for_an_image(tmp_path):
    ids = np.ones((4, 4), np.int64)
    gt = write_panoptic(tmp_path, "gt", [(1, ids, [seg(1, 1)]), (2, ids, [seg(1, 1)])])
    pred = write_panoptic(tmp_path, "pred", [(1, ids, [seg(1, 1)])])
    with pytest.raises(KeyError, match="no prediction for the image with id: 2"):
        pq_compute(gt, pred, progress=False, strict=True)
    results = pq_compute(gt, pred, progress=False)
    assert results["failed_images"] == {"2": "no prediction for the image with id: 2"}
    assert results["num_images"] == 1 and results["All"]["pq"] == 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_one_bad_image_never_costs_the_others(tmp_path, workers):
    """Each kind of per-image failure lands in failed_images with its reason; the PQ of the rest is
    what the good images alone give."""
    rng = np.random.default_rng(3)
    good = [(i, *random_image(rng)) for i in range(3)]
    ids = np.ones((6, 6), np.int64)
    bad = [(10, ids, [seg(1, 3)], ids[:4], [seg(1, 3)]),           # id maps of two shapes
           (11, ids, [seg(1, 3)], ids * 7, [seg(1, 3)]),            # predicted segment 7 not in segments_info
           (12, ids, [seg(1, 3)], ids, [seg(1, 42)]),               # unknown category
           (13, ids, [seg(1, 3)], ids, [seg(1, 3)]),                # prediction PNG deleted below
           (14, ids, [seg(1, 3)], ids, [seg(1, 3)])]                # prediction PNG truncated below
    everything = good + bad
    gt = write_panoptic(tmp_path, "gt", [(i, g, gs) for i, g, gs, _, _ in everything])
    pred = write_panoptic(tmp_path, "pred", [(i, p, ps) for i, _, _, p, ps in everything])
    (tmp_path / "pred" / f"{13:012d}.png").unlink()
    png = tmp_path / "pred" / f"{14:012d}.png"
    png.write_bytes(png.read_bytes()[:20])

    results = pq_compute(gt, pred, workers=workers, progress=False)

    failed = results["failed_images"]
    assert sorted(failed) == ["10", "11", "12", "13", "14"] and results["num_images"] == 3
    assert "differ in shape" in failed["10"]
    assert "KeyError" in failed["11"] and "[7]" in failed["11"]
    assert "unknown category_id 42" in failed["12"]
    assert f"{13:012d}.png" in failed["13"]
    assert failed["14"]
    expected = pq_average(merge_pq_stats(*(brute_force_stats(g, gs, p, ps) for _, g, gs, p, ps in good)), CATEGORIES)
    for split in ("All", "Things", "Stuff"):
        assert results[split] == pytest.approx(expected[split], abs=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        pq_compute(gt, pred, workers=workers, progress=False, strict=True)


def test_folders_default_to_the_json_path_and_can_be_given(tmp_path):
    gt, gt_segments, pred, pred_segments = hand_case()
    default = evaluate_one(tmp_path, gt, gt_segments, pred, pred_segments)
    (tmp_path / "pred").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError):
        pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", progress=False)
    given = pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"),
                       str(tmp_path / "elsewhere"), progress=False)
    assert given == default


def test_empty_split_gives_zeros_instead_of_dividing_by_zero():
    results = pq_average({1: PQStat(iou=0.9, tp=1)}, CATEGORIES[:2])
    assert results["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert results["Things"]["pq"] == pytest.approx(0.9)


# ---- against a per-pixel brute force of the definition, on random id maps -----------------


def brute_force_stats(gt_ids, gt_segments, pred_ids, pred_segments):
    """The definition, one pixel and one segment pair at a time."""
    gt_area, pred_area, inter = collections.Counter(), collections.Counter(), collections.Counter()
    for g, p in zip(gt_ids.ravel().tolist(), pred_ids.ravel().tolist()):
        gt_area[g] += 1
        pred_area[p] += 1
        inter[g, p] += 1
    gt, pred = {s["id"]: s for s in gt_segments}, {s["id"]: s for s in pred_segments}
    stats = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    gt_matched, pred_matched = set(), set()
    for g, gs in gt.items():
        for p, ps in pred.items():
            if gs["iscrowd"] or gs["category_id"] != ps["category_id"] or inter[g, p] == 0:
                continue
            iou = inter[g, p] / (gt_area[g] + pred_area[p] - inter[g, p] - inter[0, p])
            if iou > 0.5:
                stats[gs["category_id"]][0] += iou
                stats[gs["category_id"]][1] += 1
                gt_matched.add(g)
                pred_matched.add(p)
    crowd = {}
    for g, gs in gt.items():
        if gs["iscrowd"]:
            crowd[gs["category_id"]] = g
        elif g not in gt_matched:
            stats[gs["category_id"]][3] += 1
    for p, ps in pred.items():
        if p in pred_matched:
            continue
        ignored = inter[0, p] + (inter[crowd[ps["category_id"]], p] if ps["category_id"] in crowd else 0)
        if ignored / pred_area[p] <= 0.5:
            stats[ps["category_id"]][2] += 1
    return {c: PQStat(*v) for c, v in stats.items()}


def random_image(rng, shape=(12, 16), n_segments=6):
    """Random rectangles of ground truth on VOID, some crowd; a prediction made of shifted,
    partly relabeled and partly repainted copies of them, with its own ids and some VOID."""
    gt = np.zeros(shape, np.int64)
    gt_segments = []
    for k in range(1, n_segments + 1):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(2, shape[0] // 2 + 2), rng.integers(2, shape[1] // 2 + 2)
        segment_id = int(rng.integers(1, 2 ** 24))
        gt[y:y + h, x:x + w] = segment_id
        gt_segments.append(seg(segment_id, int(rng.integers(1, 5)), int(rng.random() < 0.25)))
    # Some listed segments are missing from the PNG, some ids in the PNG are not listed.
    gt_segments = [s for s in gt_segments if rng.random() < (0.9 if (gt == s["id"]).any() else 0.5)]

    pred = np.roll(gt, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    for _ in range(2):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        pred[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = rng.choice([0, 1, 2])
    pred = np.where(rng.random(shape) < 0.05, 0, pred)
    categories = {s["id"]: s["category_id"] for s in gt_segments}
    pred_segments, relabeled = [], np.zeros_like(pred)
    for new_id, old_id in enumerate(np.unique(pred[pred > 0]).tolist(), start=1000):
        relabeled[pred == old_id] = new_id
        category = categories.get(old_id, int(rng.integers(1, 5)))
        pred_segments.append(seg(new_id, category if rng.random() < 0.8 else int(rng.integers(1, 5))))
    return gt, gt_segments, relabeled, pred_segments


def assert_stats_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for c in expected:
        assert (actual[c].tp, actual[c].fp, actual[c].fn) == (expected[c].tp, expected[c].fp, expected[c].fn)
        assert actual[c].iou == pytest.approx(expected[c].iou, abs=1e-12)


@pytest.mark.parametrize("seed", range(25))
def test_stats_agree_with_brute_force_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    for _ in range(4):
        image = random_image(rng)
        assert_stats_equal(stats_of(*image), brute_force_stats(*image))


def random_set(tmp_path, seed, n_images=6):
    rng = np.random.default_rng(seed)
    images = [random_image(rng) for _ in range(n_images)]
    gt = write_panoptic(tmp_path, "gt", [(i, g, gs) for i, (g, gs, _, _) in enumerate(images)])
    pred = write_panoptic(tmp_path, "pred", [(i, p, ps) for i, (_, _, p, ps) in enumerate(images)])
    return images, gt, pred


@pytest.mark.parametrize("seed", range(3))
def test_pq_compute_agrees_with_brute_force_on_random_sets(tmp_path, seed):
    images, gt, pred = random_set(tmp_path, seed)
    expected = pq_average(merge_pq_stats(*(brute_force_stats(*image) for image in images)), CATEGORIES)
    results = pq_compute(gt, pred, progress=False)
    assert results["per_class"] == {c: pytest.approx(v, abs=1e-12) for c, v in expected["per_class"].items()}
    for split in ("All", "Things", "Stuff"):
        assert results[split] == pytest.approx(expected[split], abs=1e-12)


def test_workers_give_the_same_result_as_in_process(tmp_path):
    _, gt, pred = random_set(tmp_path, seed=7, n_images=10)
    assert pq_compute(gt, pred, workers=2, progress=False) == pq_compute(gt, pred, workers=0, progress=False)
