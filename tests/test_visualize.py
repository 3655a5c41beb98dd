"""Labels (COCO names, panoptic categories, colours) and drawing of predictions."""
import numpy as np
import pytest

from conftest import reference_arrays
from detr_jax import labels
from detr_jax.visualize import draw_predictions, side_by_side


def test_coco_detection_names_have_the_standard_gaps():
    names = labels.coco_detection_names()
    assert len(names) == 91
    gaps = [i for i, n in enumerate(names) if n == "N/A"]
    assert gaps == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert (names[1], names[17], names[18], names[62], names[72], names[90]) == \
        ("person", "cat", "dog", "chair", "tv", "toothbrush")


def test_panoptic_categories():
    cats = labels.panoptic_categories()
    assert len(cats) == 133 and sum(c["isthing"] for c in cats) == 80
    assert all(set(c) >= {"id", "name", "isthing", "color"} for c in cats)
    cats[0]["color"][0] = -1  # a copy: the package data stays intact
    assert labels.panoptic_categories()[0]["color"][0] == 220


def test_label_names_and_colours():
    assert labels.label_name(17) == "cat" and labels.label_name(17, "coco_panoptic") == "cat"
    assert labels.label_name(184, "coco_panoptic") == "tree-merged" and labels.label_name(184) == "N/A"
    assert labels.label_name(12) == "N/A" and labels.label_name(230, "coco_panoptic") == "N/A"
    with pytest.raises(ValueError):
        labels.label_name(1, "voc")
    assert labels.category_color(1) == (220, 20, 60)
    unknown = labels.category_color(230)
    assert unknown == labels.category_color(230) and all(0 <= v <= 255 for v in unknown)


def _scene():
    image = np.full((60, 80, 3), 100, np.uint8)
    id_map = np.zeros((60, 80), np.int32)
    id_map[10:40, 20:60] = 1
    segments = [{"id": 0, "isthing": False, "category_id": 184}, {"id": 1, "isthing": True, "category_id": 17}]
    return image, id_map, segments


def test_draw_predictions_colours_segments_and_boxes():
    image, id_map, segments = _scene()
    out = draw_predictions(image, np.array([[20, 10, 60, 40]]), [17], [0.9], id_map=id_map,
                           segments_info=segments, dataset="coco_panoptic", alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    cat = np.asarray(labels.category_color(17))
    np.testing.assert_allclose(out[25, 40], (100 + cat) / 2, atol=1)  # translucent fill, inside
    assert (out[55, 5] != image[55, 5]).any()                         # the stuff segment too
    assert (out[10:40, 20] != out[25, 40]).any()                      # the box outline and contour
    assert (image == 100).all()                                       # the input is untouched


def test_draw_predictions_without_anything_returns_the_image():
    image, _, _ = _scene()
    np.testing.assert_array_equal(draw_predictions(image), image)
    out = draw_predictions(image, np.array([[5, 5, 30, 30]]), names=["thing"], colors=[(255, 0, 0)])
    np.testing.assert_array_equal(out[15, 5], [255, 0, 0])


def test_side_by_side():
    a, b = np.zeros((50, 40, 3), np.uint8), np.zeros((30, 20, 3), np.uint8)
    out = side_by_side(a, b, ("left", "right"), gap=4)
    assert out.shape[1] == 64 and out.shape[0] > 50 and out.dtype == np.uint8
    assert side_by_side(a, b, gap=4).shape == (50, 64, 3)


def test_draw_a_real_example():
    """The fixture photo with the reference model's boxes: an image, no error."""
    from detr_jax import postprocess as pp
    x = reference_arrays("forward_single.npz", ["image_orig_uint8_0", "pred_logits", "pred_boxes", "orig_sizes"])
    det = pp.postprocess_boxes(x["pred_logits"], x["pred_boxes"], x["orig_sizes"])[0]
    top = np.argsort(-det["scores"])[:5]
    out = draw_predictions(x["image_orig_uint8_0"], det["boxes"][top], det["labels"][top], det["scores"][top],
                           dataset="coco_panoptic")
    assert out.shape == x["image_orig_uint8_0"].shape
