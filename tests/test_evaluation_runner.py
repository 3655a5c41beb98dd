"""`detr-jax eval` / `evaluate_model` on a tiny synthetic COCO-panoptic folder.

The oracle test proves the plumbing: results derived from the ground truth (boxes and masks from
the panoptic PNGs, the panoptic map itself) through the same conversion path as a model's give
box AP = mask AP = PQ = 1, and the same results given to the wrong images do not.
"""
import json

import numpy as np
import pytest

from detr_jax import cli
from detr_jax.data.synthetic import generate
from detr_jax.evaluation.runner import evaluate_model, evaluate_predictions, load_dataset
from detr_jax.panoptic_format import read_id_map
from test_predict import SIDES


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=4,
                    image_size=[(64, 96), (80, 64), (72, 72)], seed=3, max_objects=4, min_size=12)


def ground_truth_results(dataset):
    """(image_id, result) in the Predictor's format from the ground truth: 0-based segment ids,
    thing boxes (xyxy, the COCO w = x_max - x_min + 1 convention) and masks from the PNGs."""
    out = []
    for info, png, segments in dataset.items:
        gt_ids = read_id_map(dataset.png_dir / png)
        id_map = np.zeros(gt_ids.shape, np.int32)
        for k, s in enumerate(segments):
            id_map[gt_ids == s["id"]] = k
        things = [s for s in segments if dataset.isthing[s["category_id"]]]
        masks = np.stack([gt_ids == s["id"] for s in things]) if things else np.zeros((0, *gt_ids.shape), bool)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        out.append((info["id"], {
            "error": None, "boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.ones(len(things)),
            "labels": np.array([s["category_id"] for s in things], np.int32), "masks": masks, "id_map": id_map,
            "segments_info": [{"id": k, "category_id": s["category_id"], "isthing": dataset.isthing[s["category_id"]]}
                              for k, s in enumerate(segments)]}))
    return out


def test_ground_truth_as_predictions_scores_one(synthetic_root):
    dataset = load_dataset(str(synthetic_root), "val2017")
    results = ground_truth_results(dataset)
    metrics = evaluate_predictions(reversed(results), dataset)   # any order
    assert metrics["num_images"] == 4
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    pq = metrics["panoptic"]
    assert pq["All"]["pq"] == pytest.approx(1.0) and pq["Things"]["n"] == 3 and pq["Stuff"]["n"] >= 2


def test_ground_truth_of_the_wrong_images_or_categories_does_not_score_one(synthetic_root):
    dataset = load_dataset(str(synthetic_root), "val2017")
    results = ground_truth_results(dataset)
    ids = [image_id for image_id, _ in results]
    boxes_only = [{k: r[k] for k in ("error", "boxes", "scores", "labels")} for _, r in results]
    rotated = [(ids[(k + 1) % len(ids)], r) for k, r in enumerate(boxes_only)]
    assert evaluate_predictions(rotated, dataset, image_ids=ids)["bbox"]["AP"] < 0.5
    swap = {1: 2, 2: 3, 3: 1}   # every thing category replaced by another
    relabeled = [(i, dict(r, labels=np.array([swap[c] for c in r["labels"]], np.int32),
                          segments_info=[dict(s, category_id=swap.get(s["category_id"], s["category_id"]))
                                         for s in r["segments_info"]])) for i, r in results]
    metrics = evaluate_predictions(relabeled, dataset)
    assert metrics["bbox"]["AP"] == 0 and metrics["segm"]["AP"] == 0
    assert metrics["panoptic"]["Things"]["pq"] == 0 and metrics["panoptic"]["Stuff"]["pq"] == pytest.approx(1.0)


def test_eval_command_with_a_random_tiny_model_writes_every_metric(tiny_checkpoint, synthetic_root, tmp_path,  # noqa: F811
                                                                   capsys):
    out = tmp_path / "eval.json"
    code = cli.main(["eval", str(tiny_checkpoint), "--data", str(synthetic_root), "--split", "val2017",
                     "--max-images", "3", "--batch-size", "2", "--short-side", str(SIDES["short_side"]),
                     "--max-size", str(SIDES["max_size"]), "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| box |" in printed and "PQ" in printed
    results = json.loads(out.read_text())
    assert results["num_images"] == 3 and results["failed_images"] == {}
    for key in ("bbox", "segm"):
        assert set(results[key]) >= {"AP", "AP50", "AP75"} and 0 <= results[key]["AP"] <= 1
    assert set(results["panoptic"]) >= {"All", "Things", "Stuff"} and 0 <= results["panoptic"]["All"]["pq"] <= 1


def test_evaluate_model_takes_config_and_variables_as_the_train_loop_has_them(tiny_checkpoint, synthetic_root):  # noqa: F811
    import detr_jax

    model = detr_jax.load(tiny_checkpoint)
    dataset = load_dataset(images=str(synthetic_root / "val2017"),
                           panoptic_json=str(synthetic_root / "annotations" / "panoptic_val2017.json"))
    results = evaluate_model((model.config, model.variables), dataset, max_images=2, progress=False,
                             short_side=SIDES["short_side"], max_size=SIDES["max_size"],
                             bucket_multiple=SIDES["bucket_multiple"])
    assert results["num_images"] == 2 and {"bbox", "segm", "panoptic"} <= set(results)


# ---- one image never costs the others ----------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory):
    """The awkward set (every kind of image, tests/awkward_set.py) with its panoptic ground truth
    damaged in each way: a missing PNG, a truncated one, one of another size, a grey one."""
    from PIL import Image

    from awkward_set import write_awkward_set

    s = write_awkward_set(tmp_path_factory.mktemp("damaged"))
    pngs = s["pngs"]
    (pngs / "rgb.png").unlink()
    (pngs / "grey.png").write_bytes((pngs / "grey.png").read_bytes()[:40])
    Image.open(pngs / "palette.png").resize((5, 5)).save(pngs / "palette.png")
    Image.open(pngs / "bilevel.png").convert("L").save(pngs / "bilevel.png")
    s["reasons"] = {"rgb": "rgb.png", "grey": "grey.png", "palette": "5x5 .*its image 12x16",
                    "bilevel": "must be RGB", "exif_neither": "annotation says 10x10 .*upright 16x12",
                    "wrong_size": "annotation says 13x16", "truncated": "truncated", "missing": "no such file"}
    return s


def test_eval_reports_each_failed_image_and_evaluates_the_rest(tiny_checkpoint, damaged_set, tmp_path, capsys):  # noqa: F811
    import re

    from awkward_set import KINDS

    out = tmp_path / "eval.json"
    code = cli.main(["eval", str(tiny_checkpoint), "--images", str(damaged_set["images"]),
                     "--panoptic-json", str(damaged_set["panoptic"]), "--panoptic-dir", str(damaged_set["pngs"]),
                     "--annotations", str(damaged_set["instances"]), "--short-side", str(SIDES["short_side"]),
                     "--max-size", str(SIDES["max_size"]), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0
    assert "| box |" in printed.out and "PQ" in printed.out
    results = json.loads(out.read_text())
    reasons = damaged_set["reasons"]
    failed = {kind: results["failed_images"].get(str(damaged_set["ids"][kind])) for kind in reasons}
    for kind, pattern in reasons.items():
        assert failed[kind] is not None and re.search(pattern, failed[kind]), (kind, failed[kind])
        assert failed[kind] in printed.err
    assert len(results["failed_images"]) == len(reasons)
    assert results["num_images"] == len(KINDS) - len(reasons)
    assert {"bbox", "segm", "panoptic"} <= set(results)


def test_eval_exits_non_zero_only_when_no_image_could_be_evaluated(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    gt = {"images": [{"id": 1, "file_name": "gone.jpg", "height": 8, "width": 8}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    code = cli.main(["eval", str(tiny_checkpoint), "--images", str(images), "--annotations",
                     str(tmp_path / "instances.json"), "--out", str(tmp_path / "eval.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no image could be evaluated" in err and "gone.jpg" in err


def test_a_predicted_segment_missing_from_segments_info_fails_that_image_only(synthetic_root):
    dataset = load_dataset(str(synthetic_root), "val2017")
    results = ground_truth_results(dataset)
    bad_id, bad = results[1]
    bad = dict(bad, segments_info=bad["segments_info"][:-1])   # the last segment's pixels are unlisted
    metrics = evaluate_predictions([results[0], (bad_id, bad)] + results[2:], dataset)
    assert list(metrics["failed_images"]) == [str(bad_id)]
    assert "present in the PNG" in metrics["failed_images"][str(bad_id)]
    assert metrics["num_images"] == 3 and metrics["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_evaluate_model_leaves_the_callers_predictor_as_it_was(tiny_checkpoint, synthetic_root):  # noqa: F811
    from detr_jax.predict import Predictor

    predictor = Predictor(tiny_checkpoint, threshold=0.0, **SIDES)
    before = dict(vars(predictor))
    results = evaluate_model(predictor, load_dataset(str(synthetic_root), "val2017"), max_images=1, progress=False)
    assert "segm" in results                      # the copy returned masks
    assert vars(predictor) == before and predictor.return_masks is False and predictor.shape_stats == {}
