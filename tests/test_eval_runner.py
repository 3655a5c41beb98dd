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
from detr_jax.eval_runner import evaluate_model, evaluate_predictions, load_dataset
from detr_jax.panoptic_quality import read_id_map
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
