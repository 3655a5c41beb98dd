"""One image decoder: the dataset readers and inference's `load_image` see the same pixels for
every kind of file, and the EXIF policy picks the frame the annotations refer to."""
import logging

import numpy as np
import pytest
from PIL import Image

from awkward_set import KINDS, PLAIN, SPECIAL, UNREADABLE, expected_pixels, write_awkward_set
from detr_jax.data.coco import BadSampleError, CocoDetection, CocoPanoptic
from detr_jax.data.image import ImageLoadError, ImageSizeError, decode_image
from detr_jax.data.loader import Loader
from detr_jax.data.preprocess import load_image


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    s = write_awkward_set(tmp_path_factory.mktemp("awkward"))
    s["detection"] = CocoDetection(images_dir=s["images"], ann_file=s["instances"])
    s["panoptic_set"] = CocoPanoptic(images_dir=s["images"], ann_file=s["panoptic"], png_dir=s["pngs"])
    return s


def _record(dataset, image_id):
    return dataset[[info["id"] for info, *_ in dataset.items].index(image_id)]


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in UNREADABLE])
def test_readers_return_the_annotated_frame_as_rgb_uint8(awkward, kind):
    expected = expected_pixels(kind, awkward["paths"][kind])
    for dataset in (awkward["detection"], awkward["panoptic_set"]):
        record = _record(dataset, awkward["ids"][kind])
        assert record["image"].dtype == np.uint8 and record["image"].shape == expected.shape
        np.testing.assert_array_equal(record["image"], expected)
        assert tuple(record["orig_size"]) == awkward["sizes"][kind]


@pytest.mark.parametrize("kind", [k for k in PLAIN] + ["exif_upright"])
def test_inference_sees_the_same_pixels_as_training(awkward, kind):
    """The files without EXIF, and the upright-annotated EXIF photo: `load_image` and the readers agree."""
    record = _record(awkward["detection"], awkward["ids"][kind])
    np.testing.assert_array_equal(load_image(awkward["paths"][kind]), record["image"])


def test_sixteen_bit_grey_is_scaled_not_saturated(awkward):
    pixels = _record(awkward["detection"], awkward["ids"]["grey16"])["image"]
    assert len(np.unique(pixels)) > 100          # saturation would leave almost only 255
    assert (pixels < 255).mean() > 0.9


def test_exif_rotated_photo_annotated_upright_keeps_its_boxes_and_masks(awkward):
    h, w = SPECIAL["exif_upright"]
    det = _record(awkward["detection"], awkward["ids"]["exif_upright"])
    np.testing.assert_array_equal(det["boxes"], [[w // 2, h // 2, w, h]])    # not clipped to the stored frame
    pan = _record(awkward["panoptic_set"], awkward["ids"]["exif_upright"])
    assert pan["masks"].shape == (2, h, w) and pan["masks"][0, h // 2:, w // 2:].all()


def test_inference_always_applies_the_exif_orientation(awkward):
    stored = expected_pixels("exif_stored", awkward["paths"]["exif_stored"])
    np.testing.assert_array_equal(load_image(awkward["paths"]["exif_stored"]), np.rot90(stored, k=-1))


@pytest.mark.parametrize("kind, reason", [
    ("exif_neither", "annotation says 10x10 .*stored 12x16 .*upright 16x12"),
    ("wrong_size", "annotation says 13x16 .*stored 12x16"),
    ("truncated", "truncated"),
    ("missing", "no such file"),
])
def test_unusable_images_are_skipped_with_the_reason(awkward, kind, reason):
    for dataset in (awkward["detection"], awkward["panoptic_set"]):
        with pytest.raises(BadSampleError, match=reason):
            _record(dataset, awkward["ids"][kind])


def test_the_loader_skips_them_with_a_warning_naming_the_sizes(awkward, caplog):
    loader = Loader(awkward["detection"], batch_size=len(KINDS), shuffle=False, num_workers=1)
    with caplog.at_level(logging.WARNING):
        batch = next(loader.epoch(0))
    assert "10x10" in caplog.text and "12x16" in caplog.text and "16x12" in caplog.text
    assert loader.num_skipped == len(UNREADABLE)
    assert batch["sample_valid"].sum() == len(KINDS) - len(UNREADABLE)


def test_decode_image_with_an_annotated_size_checks_arrays_too():
    array = np.zeros((4, 5, 3), np.uint8)
    assert decode_image(array, annotated_size=(4, 5)).shape == (4, 5, 3)
    with pytest.raises(ImageSizeError, match="5x4"):
        decode_image(array, annotated_size=(5, 4))
    assert issubclass(ImageSizeError, ImageLoadError)


def test_orientation_that_keeps_the_size_keeps_the_stored_frame_for_readers(tmp_path):
    """Orientation 3 (180 degrees): both frames have the annotated size; COCO's convention wins."""
    exif = Image.Exif()
    exif[0x0112] = 3
    path = tmp_path / "turned.png"
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(decode_image(path, annotated_size=(2, 3)), pixels)
    np.testing.assert_array_equal(decode_image(path), pixels[::-1, ::-1])
