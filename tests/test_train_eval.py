"""Periodic evaluation during training (`detr-jax train --eval-every N`): box AP, segm AP and PQ
of the current parameters on the validation split, logged to metrics.jsonl as `eval/...` rows
every N steps and at the end.

One short run of the tiny panoptic model on the synthetic dataset, through `train.run` (what the
CLI calls), with the config's data sizes fixed so that the train step compiles once.
"""
import json

import pytest

from detr_jax import cli, train as train_module
from detr_jax.data.synthetic import generate
from detr_jax.evaluation.runner import load_dataset, make_eval_fn, summary_metrics
from test_train import fixed_size_config

STEPS, EVAL_EVERY, EVAL_IMAGES = 4, 2, 2


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=3, image_size=(64, 64), seed=5,
                    max_objects=3, min_size=12)


@pytest.fixture(scope="module")
def run_with_eval(synthetic_root, tmp_path_factory, monkeypatch_module):
    """`train.run` with --eval-every 2 --eval-max-images 2 on the tiny config (64-pixel images)."""
    config = fixed_size_config(max_steps=STEPS, log_every=1)
    monkeypatch_module.setattr("detr_jax.config.load_config", lambda name: config)
    workdir = tmp_path_factory.mktemp("run")
    result = train_module.run("detr_tiny", workdir, data=str(synthetic_root), split="train2017",
                              eval_every=EVAL_EVERY, eval_max_images=EVAL_IMAGES, eval_split="val2017")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"result": result, "rows": rows, "config": config}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow  # compiles the tiny model's train step and forward (30 s to minutes on a busy CPU)
def test_eval_rows_are_logged_every_n_steps_and_at_the_end(run_with_eval):
    eval_rows = [r for r in run_with_eval["rows"] if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in eval_rows] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for row in eval_rows:
        for key in ("eval/bbox_AP", "eval/bbox_AP50", "eval/segm_AP", "eval/PQ", "eval/PQ_th", "eval/PQ_st"):
            assert 0 <= row[key] <= 1, (key, row)
        assert row["eval/num_images"] == EVAL_IMAGES and row["eval/failed_images"] == 0
    train_rows = [r for r in run_with_eval["rows"] if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_the_eval_fn_scores_the_trained_parameters_as_evaluate_model_does(run_with_eval, synthetic_root):
    """The last logged row is what evaluating the exported model gives."""
    state, config = run_with_eval["result"]["state"], run_with_eval["config"]
    dataset = load_dataset(str(synthetic_root), "val2017")
    eval_fn = make_eval_fn(config.model, dataset, config.data, max_images=EVAL_IMAGES, batch_size=2)
    again = eval_fn({"params": state.params, "buffers": state.buffers}, STEPS)
    last = [r for r in run_with_eval["rows"] if "eval/PQ" in r][-1]
    for key in ("bbox_AP", "segm_AP", "PQ"):
        assert again[key] == pytest.approx(last[f"eval/{key}"], abs=1e-6), key


def test_summary_metrics_are_the_headline_numbers():
    results = {"num_images": 3, "failed_images": {"5": "unreadable"}, "seconds": 1.5,
               "bbox": {"AP": 0.5, "AP50": 0.7}, "segm": {"AP": 0.25, "AP50": 0.4},
               "panoptic": {"All": {"pq": 0.3}, "Things": {"pq": 0.2}, "Stuff": {"pq": 0.4}}}
    assert summary_metrics(results) == {"num_images": 3.0, "failed_images": 1.0, "seconds": 1.5, "bbox_AP": 0.5,
                                        "bbox_AP50": 0.7, "segm_AP": 0.25, "segm_AP50": 0.4, "PQ": 0.3,
                                        "PQ_th": 0.2, "PQ_st": 0.4}
    assert set(summary_metrics({"num_images": 1, "bbox": {"AP": 0, "AP50": 0}})) == {
        "num_images", "failed_images", "seconds", "bbox_AP", "bbox_AP50"}


def test_eval_every_needs_a_validation_split(synthetic_root, tmp_path):
    """--images / --annotations name no validation split: refused before any training."""
    with pytest.raises(ValueError, match="--eval-every.*needs --data or --tfds"):
        train_module.run("detr_tiny", tmp_path, images=str(synthetic_root / "train2017"),
                         annotations=str(synthetic_root / "annotations" / "panoptic_train2017.json"),
                         panoptic_dir=str(synthetic_root / "annotations" / "panoptic_train2017"), eval_every=5)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_passes_the_eval_and_tfds_options(monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "run", lambda *args, **kwargs: calls.append((args, kwargs)) or {"steps": 0})
    assert cli.main(["train", "--config", "detr_tiny", "--tfds", "coco/2017_panoptic", "--tfds-data-dir", "tf",
                     "--workdir", "wd", "--eval-every", "100", "--eval-max-images", "50"]) == 0
    (args, kwargs), = calls
    assert args == ("detr_tiny", "wd")
    assert kwargs["tfds"] == "coco/2017_panoptic" and kwargs["tfds_data_dir"] == "tf"
    assert kwargs["eval_every"] == 100 and kwargs["eval_max_images"] == 50 and "eval_split" not in kwargs
    assert kwargs["split"] == "train2017"   # translated to TFDS's "train" by the adapter
