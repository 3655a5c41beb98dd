"""`detr-jax demo` end to end, shortened: every file it promises exists and is valid."""
import json

import numpy as np
import pytest
from PIL import Image

from detr_jax import cli, demo
from detr_jax.demo import run_demo

SMALL = dict(num_train=16, num_val=4, image_size=(128, 128), seed=0)


@pytest.mark.slow  # compiles the demo's train step and model (about a minute on 2 cores)
def test_short_demo_writes_data_checkpoints_metrics_and_pictures(tmp_path, capsys, monkeypatch):
    metrics = run_demo(tmp_path, max_steps=3, num_pictures=2, dataset_args=SMALL, progress=False)
    for split in ("train2017", "val2017"):
        assert len(list((tmp_path / "data" / split).iterdir())) == SMALL[f"num_{split[:-4]}"]
        assert (tmp_path / "data" / "annotations" / f"panoptic_{split}.json").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_images"] == 4 and set(saved) >= {"bbox", "segm", "panoptic"}
    for value in [saved["bbox"]["AP"], saved["segm"]["AP"], saved["panoptic"]["All"]["pq"]]:
        assert 0.0 <= value <= 1.0
    assert metrics["panoptic"]["All"]["n"] == 6                     # 3 thing + 3 stuff categories
    for stage in ("detection", "masks"):   # the two stages of the panoptic recipe, 3 steps each
        rows = [json.loads(line) for line in (tmp_path / "train" / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
    assert "loss_dice" in rows[-1] and "loss_dice" not in json.loads(
        (tmp_path / "train" / "detection" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["train_steps"] == {"detection": 3, "masks": 3}
    import detr_jax

    detector, model = detr_jax.load(tmp_path / "train" / "detection" / "model"), detr_jax.load(tmp_path / "train" / "masks" / "model")
    assert model.config.num_classes == 7 and model.config.masks and not detector.config.masks
    pictures = sorted((tmp_path / "pictures").glob("val_*.png"))
    assert len(pictures) == 2
    with Image.open(pictures[0]) as picture:
        assert picture.mode == "RGB" and picture.width > 2 * 128 * 3 and picture.height > 128 * 3
    out = capsys.readouterr().out
    assert "PQ" in out and str(tmp_path / "pictures") in out

    # interrupted or repeated: the demo resumes from its checkpoint instead of starting over.  The
    # command uses the demo's dataset, here the small one (the full one takes a minute to draw).
    monkeypatch.setattr(demo, "DATASET", SMALL)
    data_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    code = cli.main(["demo", "--workdir", str(tmp_path), "--max-steps", "3", "--no-progress"])
    assert code == 0
    for stage in ("detection", "masks"):
        rows = [json.loads(line) for line in (tmp_path / "train" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [3]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")} == data_files   # not drawn again


def test_the_long_schedule_trains_both_stages_longer_and_a_wrong_name_is_refused(tmp_path):
    from detr_jax.demo import demo_stages, schedules

    assert schedules() == ["default", "long"]
    default, long = ({name: c.train for name, c in demo_stages(schedule=s)} for s in ("default", "long"))
    assert (long["detection"].max_steps, long["masks"].max_steps) == (9200, 400)
    assert long["detection"].max_steps > default["detection"].max_steps
    assert long["masks"].max_steps > default["masks"].max_steps
    assert long["detection"].lr_decay == default["detection"].lr_decay == "cosine"   # to 0 at the last step
    assert long["masks"].lr_drop_step < long["masks"].max_steps
    for name in ("detection", "masks"):   # only the steps and the lr drop change
        assert long[name].lr == default[name].lr and long[name].batch_size == default[name].batch_size
        assert long[name].stage == default[name].stage == name
    with pytest.raises(ValueError, match="unknown demo schedule 'longer'; known: \\['default', 'long'\\]"):
        run_demo(tmp_path, schedule="longer")
    assert not any(tmp_path.iterdir())    # refused before generating anything
