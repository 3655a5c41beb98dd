"""`detr-jax predict`: the files it promises, in formats the COCO tools read, and bad input handled.

The end-to-end run uses the converted recipe checkpoint on the four fixture photos (short side
320, as the fixtures); the bad-input and atomicity tests a tiny random checkpoint.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import PHOTOS, fixture_photos
from detr_jax import cli
from detr_jax.postprocess import png_to_ids
from test_predict import SIDES, random_photo, write_bad_images

NAMES = ("astronaut", "chelsea", "coffee", "motorcycle_left")


def sides(short_side, max_size):
    return ["--short-side", str(short_side), "--max-size", str(max_size), "--no-progress"]


def check_image_outputs(out, stem, panoptic=True):
    """The per-image files exist and agree: JSON fields, PNG ids = segments_info ids with their areas."""
    record = json.loads((out / f"{stem}.json").read_text())
    n = len(record["boxes"])
    assert len(record["scores"]) == len(record["labels"]) == len(record["label_names"]) == n
    assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in record["boxes"])
    vis = np.asarray(Image.open(out / f"{stem}_vis.png"))
    assert vis.shape == (record["height"], record["width"], 3)
    if panoptic:
        assert record["panoptic_png"] == f"{stem}_panoptic.png"
        ids = png_to_ids(np.asarray(Image.open(out / record["panoptic_png"])))
        assert ids.shape == (record["height"], record["width"])
        present, counts = np.unique(ids, return_counts=True)
        segments = record["segments_info"]
        if segments:
            assert min(s["id"] for s in segments) == 1    # COCO panoptic: 0 is VOID
            assert sorted(present.tolist()) == sorted(s["id"] for s in segments)
            assert {s["id"]: s["area"] for s in segments} == dict(zip(present.tolist(), counts.tolist()))
            assert all(set(s) >= {"id", "category_id", "isthing", "area", "label_name"} for s in segments)
        else:
            assert present.tolist() == [0]   # all VOID
    return record


@pytest.fixture(scope="module")
def fixture_run(converted_dir, tmp_path_factory):
    fixture_photos(*NAMES)
    out = tmp_path_factory.mktemp("predict_out")
    code = cli.main(["predict", str(converted_dir), str(PHOTOS), "--out", str(out), "--batch-size", "2",
                     *sides(320, 533)])
    return code, out


@pytest.mark.slow
def test_cli_writes_every_promised_file_for_the_fixture_photos(fixture_run):
    code, out = fixture_run
    assert code == 0
    expected = {f"{n}{suffix}" for n in NAMES for suffix in (".json", "_panoptic.png", "_vis.png")}
    assert {p.name for p in out.iterdir()} == expected | {"detections.json", "images.json", "panoptic.json"}
    images = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in images] == [f"{n}.png" for n in NAMES]
    assert [im["id"] for im in images] == [1, 2, 3, 4]      # stems are not numbers: the running index
    segments = 0
    for n, im in zip(NAMES, images):
        record = check_image_outputs(out, n)
        assert record["image_id"] == im["id"] and (record["height"], record["width"]) == (im["height"], im["width"])
        assert all(s > 0.7 for s in record["scores"])
        segments += len(record["segments_info"])
    assert segments > 20   # the recipe model finds segments on every photo


@pytest.mark.slow
def test_cli_coco_result_files_are_read_by_the_coco_tools(fixture_run):
    from detr_jax.evaluation.coco import load_coco
    from detr_jax.evaluation.pq import pq_compute

    code, out = fixture_run
    images = json.loads((out / "images.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    per_image = {im["id"]: json.loads((out / f"{os.path.splitext(im['file_name'])[0]}.json").read_text())
                 for im in images}
    assert len(detections) == sum(len(r["boxes"]) for r in per_image.values())
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"} and d["bbox"][2] >= 0 and d["bbox"][3] >= 0
    gt = {"images": images, "annotations": [], "categories": [{"id": i} for i in range(251)]}
    assert len(load_coco(gt).loadRes(detections).getAnnIds()) == len(detections)
    # panoptic.json + the PNGs as both ground truth and prediction: every segment matches itself
    result = pq_compute(out / "panoptic.json", out / "panoptic.json", out, out, progress=False)
    assert result["All"]["pq"] == pytest.approx(1.0) and result["All"]["n"] > 3


@pytest.mark.slow
def test_vis_png_is_drawn_on_the_photo(fixture_run):
    code, out = fixture_run
    vis = np.asarray(Image.open(out / "chelsea_vis.png")).astype(int)
    photo = np.asarray(Image.open(PHOTOS / "chelsea.png").convert("RGB")).astype(int)
    changed = np.abs(vis - photo).sum(-1) > 30
    assert 0.3 < changed.mean() < 1.0   # segments tinted, the photo still there


def test_cli_reports_bad_images_writes_the_good_ones_and_exits_non_zero(tiny_checkpoint, tmp_path, capsys):
    bad = write_bad_images(tmp_path / "in")
    Image.fromarray(random_photo(40, 90, 120)).save(tmp_path / "in" / "good.png")
    out = tmp_path / "out"
    code = cli.main(["predict", str(tiny_checkpoint), str(tmp_path / "in"), str(bad["missing"]), "--out", str(out),
                     "--batch-size", "2", *sides(SIDES["short_side"], SIDES["max_size"])])
    assert code == 1
    err = capsys.readouterr().err
    for case, path in bad.items():
        assert str(path) in err, f"{case} not reported"
    for reason in ("no such file", "not an image", "truncated", "max_image_pixels"):
        assert reason in err
    assert "1 of 7 images written" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "detections.json", "good.json", "good_panoptic.png", "good_vis.png", "images.json", "panoptic.json"]
    check_image_outputs(out, "good")
    assert [im["file_name"] for im in json.loads((out / "images.json").read_text())] == ["good.png"]


def test_an_image_whose_outputs_cannot_be_written_leaves_no_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import detr_jax.results_io as results_io

    for name in ("a", "b"):
        Image.fromarray(random_photo(41, 80, 100)).save(tmp_path / f"{name}.png")
    save_png = results_io._save_png

    def failing_for_b(array):
        write = save_png(array)

        def save(path):
            if path.name.startswith(".b_vis"):
                raise OSError("disk full (simulated)")
            write(path)
        return save

    monkeypatch.setattr(results_io, "_save_png", failing_for_b)
    out = tmp_path / "out"
    code = cli.main(["predict", str(tiny_checkpoint), str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out",
                     str(out), *sides(SIDES["short_side"], SIDES["max_size"])])
    assert code == 1 and "disk full (simulated)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a_panoptic.png", "a_vis.png", "detections.json", "images.json", "panoptic.json"]


def test_cli_with_no_images_is_an_error(tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["predict", str(tiny_checkpoint), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
