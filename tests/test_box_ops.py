"""Box conversions and (generalized) IoU: hand-computed values and invariants."""
import numpy as np
import pytest

from detr_jax import box_ops


def random_xyxy(rng, n):
    """`n` random valid xyxy boxes in [0, 1] (positive width and height)."""
    a = rng.uniform(0, 1, (n, 2, 2)).astype(np.float32)
    lo, hi = a.min(axis=1), a.max(axis=1) + 1e-3
    return np.concatenate([lo, hi], axis=-1)


def test_conversions_invert_each_other():
    rng = np.random.default_rng(0)
    xyxy = random_xyxy(rng, 50)
    cxcywh = np.asarray(box_ops.box_xyxy_to_cxcywh(xyxy))
    np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-6)
    np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(cxcywh)),
                               cxcywh, atol=1e-6)


def test_conversion_by_hand():
    np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(np.array([0.5, 0.4, 0.2, 0.6])),
                               [0.4, 0.1, 0.6, 0.7], atol=1e-7)
    np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(np.array([[1.0, 2.0, 4.0, 3.0]])),
                               [[2.5, 2.5, 3.0, 1.0]])


def test_area():
    np.testing.assert_allclose(box_ops.box_area(np.array([[0.0, 0.0, 2.0, 3.0], [1, 1, 1, 5]])),
                               [6.0, 0.0])


def test_iou_and_giou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_ops.box_iou(a, b)
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7; disjoint: union 4 + 1; identical: union 4
    np.testing.assert_allclose(iou, [[1 / 7, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(union, [[7.0, 5.0, 4.0]], rtol=1e-6)
    giou = box_ops.generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9, 5x2 = 10, 2x2 = 4
    np.testing.assert_allclose(giou, [[1 / 7 - 2 / 9, 0.0 - 5 / 10, 1.0]], rtol=1e-6)


def test_giou_of_a_box_with_itself_is_one_and_always_in_range():
    rng = np.random.default_rng(1)
    boxes1, boxes2 = random_xyxy(rng, 40), random_xyxy(rng, 30)
    np.testing.assert_allclose(np.diag(np.asarray(box_ops.generalized_box_iou(boxes1, boxes1))),
                               1.0, rtol=1e-6)
    giou = np.asarray(box_ops.generalized_box_iou(boxes1, boxes2))
    assert giou.shape == (40, 30)
    assert np.all(giou >= -1.0) and np.all(giou <= 1.0)
    iou, _ = box_ops.box_iou(boxes1, boxes2)
    assert np.all(giou <= np.asarray(iou) + 1e-6)      # GIoU <= IoU


def test_giou_tends_to_minus_one_for_far_apart_boxes():
    a = np.array([[0.0, 0.0, 1e-3, 1e-3]])
    b = np.array([[0.999, 0.999, 1.0, 1.0]])
    assert float(box_ops.generalized_box_iou(a, b)[0, 0]) == pytest.approx(-1.0, abs=1e-5)


def test_elementwise_is_the_pairwise_diagonal_and_batches():
    rng = np.random.default_rng(2)
    boxes1 = random_xyxy(rng, 12).reshape(3, 4, 4)
    boxes2 = random_xyxy(rng, 12).reshape(3, 4, 4)
    pairwise = np.asarray(box_ops.generalized_box_iou(boxes1, boxes2))      # [3, 4, 4]
    assert pairwise.shape == (3, 4, 4)
    np.testing.assert_allclose(box_ops.generalized_box_iou_elementwise(boxes1, boxes2),
                               np.diagonal(pairwise, axis1=1, axis2=2), rtol=1e-6)
    iou, union = box_ops.box_iou(boxes1, boxes2)
    iou_e, union_e = box_ops.box_iou_elementwise(boxes1, boxes2)
    np.testing.assert_allclose(iou_e, np.diagonal(np.asarray(iou), axis1=1, axis2=2), rtol=1e-6)
    np.testing.assert_allclose(union_e, np.diagonal(np.asarray(union), axis1=1, axis2=2), rtol=1e-6)
