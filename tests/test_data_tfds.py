"""TensorFlow Datasets' coco/2017 and coco/2017_panoptic through `detr_jax.data.tfds`, on
`tfds.testing.mock_data`.

Two kinds of mock data: TFDS's own random examples (tiny images, panoptic PNGs of another size,
per-object fields of unequal lengths, segment ids absent from the PNG), which the adapter must
survive with records that keep the contract; and hand-made examples served through the same
mocked `as_data_source`, whose records are known exactly (boxes, COCO category ids, crowd,
masks from the id PNG, a PNG at half the image's size).  Then the Loader, a few train steps,
`evaluate_model` (ground truth as predictions scores 1) and `detr-jax eval --tfds`.
"""
import dataclasses
import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets",
                           reason="the TFDS adapter needs the tfds extra: pip install -e '.[dev,tfds]'")

from detr_jax import cli  # noqa: E402
from detr_jax.data.coco import masks_to_boxes  # noqa: E402
from detr_jax.data.loader import Loader  # noqa: E402
from detr_jax.data.tfds import (TfdsCocoDetection, TfdsCocoPanoptic, load_tfds, require_tfds,  # noqa: E402
                                tfds_split)
from detr_jax.data.transforms import TrainTransform  # noqa: E402
from detr_jax.evaluation.runner import evaluate_model, evaluate_predictions, load_dataset  # noqa: E402
from detr_jax.labels import panoptic_categories  # noqa: E402
from detr_jax.panoptic_format import id_to_rgb  # noqa: E402
from test_predict import SIDES  # noqa: E402

PANOPTIC_IDS = sorted(c["id"] for c in panoptic_categories())     # TFDS label i -> PANOPTIC_IDS[i]
THING_IDS = sorted(c["id"] for c in panoptic_categories() if c["isthing"])
STUFF_ID = next(i for i in PANOPTIC_IDS if i > 90)                  # the first stuff category
NUM_RANDOM = 6   # mock records; their image ids are distinct


def mock_with(examples):
    """mock_data whose `as_data_source` serves these examples (TFDS's decoded format)."""
    return tfds.testing.mock_data(as_data_source_fn=lambda builder, split=None, **kwargs: list(examples))


def objects(bbox, label, is_crowd, ids, area=None):
    n = len(label)
    return {"bbox": np.asarray(bbox, np.float32).reshape(n, 4), "label": np.asarray(label, np.int64),
            "is_crowd": np.asarray(is_crowd, bool), "id": np.asarray(ids, np.int64),
            "area": np.asarray(area if area is not None else [100] * n, np.int64)}


def detection_example(image_id=7, h=50, w=80):
    """person (label 0), a crowd toothbrush (label 79), a degenerate box, one partly outside."""
    image = np.random.default_rng(image_id).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return {"image": image, "image/filename": f"{image_id:012d}.jpg", "image/id": np.int64(image_id),
            "objects": objects([[0.1, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.6],
                                [0.9, 0.9, 1.2, 1.1]], [0, 79, 5, 2], [False, True, False, False], [1, 2, 3, 4])}


DETECTION_BOXES = np.array([[20, 5, 60, 25], [0, 0, 80, 50], [72, 45, 80, 50]], np.float32)  # the kept ones
DETECTION_LABELS = [THING_IDS[0], THING_IDS[79], THING_IDS[2]]


def panoptic_ids(h, w):
    """An id map: person 1000 (rows 2..6, cols 4..9), crowd car 2000 (rows 10..13, cols 0..4), stuff 3000."""
    ids = np.full((h, w), 3000, np.int64)
    ids[2:7, 4:10] = 1000
    ids[10:14, 0:5] = 2000
    return ids


def panoptic_example(image_id, png_scale=1):
    """Image 2 * 15 x 2 * 20; the PNG drawn at 15 x 20 and upscaled by 2 / png_scale.  Segments 4000
    (absent from the PNG) and 0 (VOID) are listed too."""
    small = panoptic_ids(15, 20)
    full = small.repeat(2, 0).repeat(2, 1)
    png = small.repeat(2 // png_scale, 0).repeat(2 // png_scale, 1)
    image = np.random.default_rng(image_id).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    labels = [PANOPTIC_IDS.index(c) for c in (1, 3, STUFF_ID, 1, 1)]
    return {"image": image, "image/filename": f"{image_id:012d}.jpg", "image/id": np.int64(image_id),
            "panoptic_image": id_to_rgb(png), "panoptic_image/filename": f"{image_id:012d}.png",
            "panoptic_objects": objects(np.zeros((5, 4)), labels, [False, True, False, False, False],
                                        [1000, 2000, 3000, 4000, 0])}, full


# ------------------------------------------------------------------------------------------------
# Fixtures: datasets built once per module (importing TensorFlow takes seconds)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_sets():
    with tfds.testing.mock_data(num_examples=NUM_RANDOM):
        sets = {"detection": TfdsCocoDetection("coco/2017", "validation", drop_crowd=False),
                "panoptic": TfdsCocoPanoptic("coco/2017_panoptic", "validation"),
                "raw": tfds.builder("coco/2017").as_data_source(split="validation")}
    return sets


@pytest.fixture(scope="module")
def detection_set():
    with mock_with([detection_example(7), detection_example(8, h=40, w=30)]):
        return TfdsCocoDetection("coco/2017", "train", drop_crowd=False)


@pytest.fixture(scope="module")
def panoptic_set():
    examples = [panoptic_example(11 + i, png_scale=1 + i % 2)[0] for i in range(4)]
    with mock_with(examples):
        return TfdsCocoPanoptic("coco/2017_panoptic", "validation")


def check_contract(record, panoptic):
    h, w = record["image"].shape[:2]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (h, w, 3)
    assert isinstance(record["image_id"], int)
    assert record["orig_size"].dtype == np.int32 and record["orig_size"].tolist() == [h, w]
    n = len(record["labels"])
    assert record["boxes"].dtype == np.float32 and record["boxes"].shape == (n, 4)
    assert record["labels"].dtype == np.int32 and record["iscrowd"].dtype == bool and record["area"].dtype == np.float32
    assert len(record["iscrowd"]) == len(record["area"]) == n
    boxes = record["boxes"]
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
    if panoptic:
        assert record["masks"].dtype == bool and record["masks"].shape == (n, h, w)
        assert record["segment_ids"].dtype == np.int64 and record["isthing"].dtype == bool
        assert len(record["segment_ids"]) == len(record["isthing"]) == n
        assert np.all(record["masks"].any(axis=(1, 2)))
        assert set(record["labels"].tolist()) <= set(PANOPTIC_IDS)
    else:
        assert "masks" not in record
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        assert set(record["labels"].tolist()) <= set(THING_IDS)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def test_random_mock_records_keep_the_record_contract(random_sets):
    for kind in ("detection", "panoptic"):
        dataset = random_sets[kind]
        assert len(dataset) == NUM_RANDOM
        for i in range(len(dataset)):
            check_contract(dataset[i], panoptic=kind == "panoptic")
    detection, panoptic = random_sets["detection"], random_sets["panoptic"]
    assert detection.num_classes == 91 and len(detection.categories) == 80
    assert panoptic.num_classes == 201 and len(panoptic.categories) == 133
    # what the random data gets wrong is counted, not raised
    assert detection.stats["degenerate boxes"] > 0
    assert panoptic.stats["panoptic PNGs resized to their image"] > 0


def test_random_mock_boxes_are_the_normalized_tfds_boxes_in_pixels(random_sets):
    record, raw = random_sets["detection"][0], random_sets["raw"][0]
    h, w = raw["image"].shape[:2]
    objs = raw["objects"]
    n = min(len(v) for v in objs.values())
    ymin, xmin, ymax, xmax = np.asarray(objs["bbox"][:n]).T
    expected = np.clip(np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1), 0, [w, h, w, h])
    keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    np.testing.assert_allclose(record["boxes"], expected[keep], rtol=1e-6)
    assert record["labels"].tolist() == [THING_IDS[k] for k in np.asarray(objs["label"][:n])[keep]]
    assert record["iscrowd"].tolist() == np.asarray(objs["is_crowd"][:n])[keep].tolist()


def test_detection_boxes_labels_and_crowd(detection_set):
    record = detection_set[0]
    np.testing.assert_allclose(record["boxes"], DETECTION_BOXES, atol=1e-4)
    assert record["labels"].tolist() == DETECTION_LABELS == [1, 90, 3]
    assert record["iscrowd"].tolist() == [False, True, False]
    assert record["image_id"] == 7 and record["orig_size"].tolist() == [50, 80]
    assert detection_set.stats["degenerate boxes"] >= 1


def test_training_drops_crowd_and_contiguous_labels_count_from_zero():
    with mock_with([detection_example(7)]):
        training = load_tfds("coco/2017", "train2017")          # COCO folder names are translated
        contiguous = TfdsCocoDetection("coco/2017", "train", contiguous_labels=True)
    assert isinstance(training, TfdsCocoDetection) and training.split == "train"
    record = training[0]
    assert record["labels"].tolist() == [1, 3] and not record["iscrowd"].any()
    assert contiguous[0]["labels"].tolist() == [0, 2] and contiguous.num_classes == 80
    assert tfds_split("val2017") == "validation" and tfds_split("validation[:10]") == "validation[:10]"


def test_panoptic_masks_come_from_the_id_png_even_at_another_size(panoptic_set):
    for index in range(len(panoptic_set)):   # PNGs at the image's size and at half of it
        record = panoptic_set[index]
        _, full = panoptic_example(11 + index)
        assert record["segment_ids"].tolist() == [1000, 2000, 3000]   # 4000 (absent) and 0 (VOID) dropped
        np.testing.assert_array_equal(record["masks"], full[None] == np.array([1000, 2000, 3000])[:, None, None])
        np.testing.assert_array_equal(record["boxes"], masks_to_boxes(record["masks"]))
        assert record["labels"].tolist() == [1, 3, STUFF_ID]
        assert record["isthing"].tolist() == [True, True, False]
        assert record["iscrowd"].tolist() == [False, True, False]   # panoptic keeps crowd by default
        check_contract(record, panoptic=True)
    assert panoptic_set.stats["panoptic PNGs resized to their image"] >= 2
    with mock_with([panoptic_example(11)[0]]):
        no_crowd = TfdsCocoPanoptic("coco/2017_panoptic", "train", drop_crowd=True)
    assert no_crowd[0]["segment_ids"].tolist() == [1000, 3000]


def test_the_wrong_reader_for_a_builder_and_a_missing_tfds_are_clear_errors(monkeypatch):
    with tfds.testing.mock_data(num_examples=1):
        with pytest.raises(ValueError, match="use TfdsCocoPanoptic"):
            TfdsCocoDetection("coco/2017_panoptic", "train")
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install \"detr-jax\[tfds\]\""):
        require_tfds()


# ------------------------------------------------------------------------------------------------
# Batching and training
# ------------------------------------------------------------------------------------------------
def test_the_loader_batches_tfds_records(panoptic_set):
    from detr_jax.config import load_config

    data = load_config("detr_tiny").data
    loader = Loader(panoptic_set, 2, TrainTransform(data), seed=0, config=data)
    batch = next(loader.iterate())
    b, h, w, _ = batch["pixel_values"].shape
    assert b == 2 and batch["masks"].shape == (2, data.max_boxes, h, w)
    assert batch["valid"].sum(1).tolist() == [3, 3] and batch["sample_valid"].all()
    assert set(batch["labels"][batch["valid"]].tolist()) <= {1, 3, STUFF_ID}
    assert set(batch["image_id"].tolist()) <= {11, 12, 13, 14}


def test_train_builds_tfds_datasets_and_refuses_mask_losses_without_masks():
    from detr_jax.config import load_config
    from detr_jax.train import build_dataset

    config = load_config("detr_tiny")   # panoptic, mask losses on
    stage1 = dataclasses.replace(config, train=dataclasses.replace(config.train, stage="detection"))
    with tfds.testing.mock_data(num_examples=2):
        assert isinstance(build_dataset(config, tfds="coco/2017_panoptic"), TfdsCocoPanoptic)
        with pytest.raises(ValueError, match="no instance masks"):
            build_dataset(config, tfds="coco/2017")
        detection = build_dataset(stage1, tfds="coco/2017")   # the CLI's default split, train2017
    assert isinstance(detection, TfdsCocoDetection) and detection.drop_crowd and detection.split == "train"


@pytest.mark.slow  # compiles the tiny model's train step (20 s to minutes on a busy CPU)
def test_a_few_train_steps_on_tfds_mock_data(panoptic_set, tmp_path):
    """Stage 1 of the panoptic recipe (boxes from the segments; the mask losses on the same
    records are test_train.py's) on TFDS records, with the dataset's label space."""
    from detr_jax.train import train
    from test_train import fixed_size_config

    config = fixed_size_config(max_steps=2, log_every=1, stage="detection")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=panoptic_set.num_classes))
    result = train(config, tmp_path, panoptic_set, progress=False)
    assert result["steps"] == 2 and np.isfinite(result["metrics"]["loss"])
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(result["metrics"])
    assert (tmp_path / "model" / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def ground_truth_results(dataset):
    """(image_id, result) in the Predictor's format made from the dataset's own ground truth."""
    out = []
    for index in range(len(dataset)):
        gt_ids, segments = dataset.panoptic_gt(index)
        id_map = np.zeros(gt_ids.shape, np.int32)
        for k, s in enumerate(segments):
            id_map[gt_ids == s["id"]] = k
        things = [s for s in segments if dataset.isthing[s["category_id"]]]
        masks = np.stack([gt_ids == s["id"] for s in things])
        boxes = masks_to_boxes(masks) + np.array([0, 0, 1, 1], np.float32)   # COCO's w = x_max - x_min + 1
        out.append((dataset.image_info(index)["id"], {
            "error": None, "boxes": boxes, "scores": np.ones(len(things)), "masks": masks, "id_map": id_map,
            "labels": np.array([s["category_id"] for s in things], np.int32),
            "segments_info": [{"id": k, "category_id": s["category_id"], "isthing": dataset.isthing[s["category_id"]]}
                              for k, s in enumerate(segments)]}))
    return out


def test_ground_truth_as_predictions_scores_one_on_tfds(panoptic_set):
    metrics = evaluate_predictions(ground_truth_results(panoptic_set), panoptic_set)
    assert metrics["num_images"] == 4
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    pq = metrics["panoptic"]
    assert pq["All"]["pq"] == pytest.approx(1.0) and pq["Things"]["n"] == 1 and pq["Stuff"]["n"] == 1
    info = panoptic_set.image_info(1)
    assert info == {"id": 12, "file_name": "000000000012.jpg", "height": 30, "width": 40}


def test_evaluate_model_on_tfds_mock_data(tiny_checkpoint, panoptic_set, random_sets):
    kwargs = dict(progress=False, short_side=SIDES["short_side"], max_size=SIDES["max_size"],
                  bucket_multiple=SIDES["bucket_multiple"])
    panoptic = evaluate_model(tiny_checkpoint, panoptic_set, max_images=3, batch_size=2, **kwargs)
    assert panoptic["num_images"] == 3 and panoptic["failed_images"] == {}
    assert {"bbox", "segm", "panoptic"} <= set(panoptic) and 0 <= panoptic["panoptic"]["All"]["pq"] <= 1
    detection = evaluate_model(tiny_checkpoint, random_sets["detection"], max_images=2, **kwargs)
    assert detection["num_images"] == 2 and "bbox" in detection
    assert "segm" not in detection and "panoptic" not in detection   # coco/2017 has no masks


def test_eval_command_on_tfds(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    with tfds.testing.mock_data(num_examples=3):
        code = cli.main(["eval", str(tiny_checkpoint), "--tfds", "coco/2017_panoptic", "--split", "validation",
                         "--short-side", str(SIDES["short_side"]), "--max-size", str(SIDES["max_size"]),
                         "--out", str(out), "--no-progress"])
    assert code == 0 and "| box |" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["num_images"] == 3 and set(results["bbox"]) >= {"AP", "AP50"}
    with tfds.testing.mock_data(num_examples=2):
        dataset = load_dataset(tfds="coco/2017", split="val2017")
    assert isinstance(dataset, TfdsCocoDetection) and not dataset.drop_crowd and dataset.split == "validation"
