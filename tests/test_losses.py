"""The set criterion: parity with the original's losses and gradients on the loss fixtures, the
mask upsampling convention, and Scenic-style properties on small synthetic batches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_matcher import LOSS_CASES, load_loss_case

from detr_jax import losses
from detr_jax.config import LossConfig

criterion = jax.jit(losses.set_criterion, static_argnames=("config", "axis_name"))


def loss_and_grads(outputs, targets, config):
    """All terms and the gradient of the weighted total w.r.t. the outputs, in one compile."""
    def total(out):
        terms = losses.set_criterion(out, targets, config)
        return terms["loss"], terms
    (_, terms), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(outputs)
    return terms, grads


@pytest.mark.parametrize("name", LOSS_CASES)
def test_losses_and_gradients_match_the_original(name):
    ref, outputs, targets, _ = load_loss_case(name)
    config = LossConfig(masks="pred_masks" in outputs, aux_loss="aux_outputs" in outputs)
    terms, grads = loss_and_grads(outputs, targets, config)

    expected = {k[len("loss__"):]: float(v) for k, v in ref.items() if k.startswith("loss__")}
    assert set(terms) == set(expected) | {"loss"}
    for key, value in expected.items():
        assert float(terms[key]) == pytest.approx(value, rel=1e-5, abs=1e-12), key
    assert float(terms["loss"]) == pytest.approx(float(ref["weighted_total"]), rel=1e-5)

    got = {"pred_logits": grads["pred_logits"], "pred_boxes": grads["pred_boxes"]}
    if config.masks:
        got["pred_masks"] = grads["pred_masks"]
    if config.aux_loss:
        for field in ("pred_logits", "pred_boxes"):
            got[f"aux_{field}"] = np.stack([g[field] for g in grads["aux_outputs"]])
    for key, value in got.items():
        reference = ref[f"grad_{key}"]
        scale = np.abs(reference).max()
        np.testing.assert_array_less(np.abs(np.asarray(value) - reference), 1e-5 * scale + 1e-12,
                                     err_msg=key)


@pytest.mark.parametrize("size,out", [((24, 32), (96, 128)), ((5, 7), (13, 17)),
                                      ((16, 12), (6, 5))])
def test_mask_resize_is_torch_bilinear_without_align_corners(size, out):
    x = np.random.default_rng(0).normal(size=(2, 3) + size).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=out, mode="bilinear",
                                               align_corners=False).numpy()
    np.testing.assert_allclose(losses.upsample_masks(x, out), expected, atol=1e-5)


# ---- properties on a small synthetic batch: B=3, Q=6, 4 classes + no-object, M=3 ----------

def synthetic(rng, counts=(2, 0, 3), queries=6, classes=4, slots=3, exact_boxes=False,
              num_aux=0):
    """Random outputs and padded targets (image b has counts[b] objects, masks 8x12 vs 4x6)."""
    batch = len(counts)
    valid = np.arange(slots)[None, :] < np.array(counts)[:, None]
    centers = rng.uniform(0.3, 0.7, (batch, slots, 2))
    sizes = rng.uniform(0.1, 0.4, (batch, slots, 2))
    targets = {"labels": rng.integers(0, classes, (batch, slots)).astype(np.int32),
               "boxes": np.where(valid[..., None], np.concatenate([centers, sizes], -1), 0.0
                                 ).astype(np.float32),
               "valid": valid,
               "masks": (rng.uniform(size=(batch, slots, 8, 12)) < 0.4) & valid[..., None, None]}
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, queries, 2)),
                            rng.uniform(0.05, 0.5, (batch, queries, 2))], -1).astype(np.float32)
    logits = rng.normal(size=(batch, queries, classes + 1)).astype(np.float32)
    if exact_boxes:        # query k predicts target k exactly and confidently
        boxes[:, :slots] = np.where(valid[..., None], targets["boxes"], boxes[:, :slots])
        logits[:, :slots] += 20 * np.eye(classes + 1)[targets["labels"]] * valid[..., None]
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "pred_masks": rng.normal(size=(batch, queries, 4, 6)).astype(np.float32)}
    if num_aux:
        outputs["aux_outputs"] = [{"pred_logits": rng.normal(size=logits.shape).astype(np.float32),
                                   "pred_boxes": np.clip(boxes + 0.01 * (i + 1), 0, 1)}
                                  for i in range(num_aux)]
    return outputs, targets


MASKS_AUX = LossConfig(masks=True, aux_loss=True)


def test_boxes_equal_to_targets_give_zero_box_losses():
    outputs, targets = synthetic(np.random.default_rng(0), exact_boxes=True)
    terms = criterion(outputs, targets, config=LossConfig(masks=True, aux_loss=False))
    assert float(terms["loss_bbox"]) == 0.0
    assert float(terms["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["class_error"]) == 0.0


def test_aux_losses_equal_the_main_loss_for_equal_outputs():
    outputs, targets = synthetic(np.random.default_rng(1))
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"],
                               "pred_boxes": outputs["pred_boxes"]}] * 2
    terms = criterion(outputs, targets, config=MASKS_AUX)
    assert "loss_mask_0" not in terms and "class_error_0" not in terms   # final layer only
    for i in range(2):
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert float(terms[f"{name}_{i}"]) == float(terms[name]), (name, i)


def test_total_is_the_weighted_sum_of_the_terms():
    outputs, targets = synthetic(np.random.default_rng(2), num_aux=2)
    config = dataclasses.replace(MASKS_AUX, ce_weight=1.5, bbox_weight=3.0, giou_weight=0.5,
                                 mask_weight=2.0, dice_weight=4.0)
    terms = {k: float(v) for k, v in criterion(outputs, targets, config=config).items()}
    weights = {"loss_ce": 1.5, "loss_bbox": 3.0, "loss_giou": 0.5, "loss_mask": 2.0,
               "loss_dice": 4.0}
    names = list(weights) + [f"{n}_{i}" for n in ("loss_ce", "loss_bbox", "loss_giou")
                             for i in (0, 1)]
    expected = sum(weights[n.rsplit("_", 1)[0] if n[-1].isdigit() else n] * terms[n] for n in names)
    assert terms["loss"] == pytest.approx(expected, rel=1e-6)


def test_padding_does_not_change_anything():
    outputs, targets = synthetic(np.random.default_rng(3), num_aux=1)
    wider = {k: np.concatenate([v, np.zeros((v.shape[0], 2) + v.shape[2:], v.dtype)], axis=1)
             for k, v in targets.items()}
    a = criterion(outputs, targets, config=MASKS_AUX)
    b = criterion(outputs, wider, config=MASKS_AUX)
    for key in a:
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key


def test_an_invalid_row_counts_for_nothing():
    """A batch with a filler row (sample_valid False, targets of its own) gives the losses and
    gradients of the batch without that row, and no gradient reaches the filler row."""
    outputs, targets = synthetic(np.random.default_rng(7), counts=(2, 3, 1), num_aux=1)
    flagged = dict(targets, sample_valid=np.array([True, False, True]))
    keep = np.array([0, 2])
    without = {k: v[keep] for k, v in targets.items()}
    without_outputs = jax.tree.map(lambda x: x[keep], outputs)
    terms, grads = loss_and_grads(outputs, flagged, MASKS_AUX)
    expected_terms, expected_grads = loss_and_grads(without_outputs, without, MASKS_AUX)
    assert set(terms) == set(expected_terms)
    for key in terms:
        assert float(terms[key]) == pytest.approx(float(expected_terms[key]), rel=1e-6, abs=1e-7), key
    for path, got, expected in zip(jax.tree_util.tree_leaves_with_path(grads),
                                   jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(got)[keep], expected, rtol=1e-5, atol=1e-7, err_msg=str(path[0]))
        assert not np.asarray(got)[1].any(), path[0]
    all_valid = loss_and_grads(outputs, targets, MASKS_AUX)[0]
    assert float(all_valid["loss"]) != pytest.approx(float(terms["loss"]))   # the row did count before


def test_a_batch_of_filler_rows_only_is_a_zero_loss_with_zero_gradients():
    """Every image of the batch unreadable (the loader's rows all have sample_valid False): the
    losses are 0 and finite, not 0 / 0, and nothing is learned from the batch."""
    outputs, targets = synthetic(np.random.default_rng(8), counts=(2, 3, 1), num_aux=1)
    fillers = dict(targets, sample_valid=np.zeros(3, bool))
    terms, grads = loss_and_grads(outputs, fillers, MASKS_AUX)
    for name in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert float(terms[name]) == 0.0, name
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_no_targets_at_all_is_finite_with_zero_box_gradients():
    outputs, _ = synthetic(np.random.default_rng(4))
    empty = {"labels": np.zeros((3, 0), np.int32), "boxes": np.zeros((3, 0, 4), np.float32),
             "valid": np.zeros((3, 0), bool), "masks": np.zeros((3, 0, 8, 12), bool)}
    config = LossConfig(masks=True, aux_loss=False)
    terms, grads = loss_and_grads(outputs, empty, config)
    assert float(terms["class_error"]) == 100.0
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert float(terms[name]) == 0.0, name
    assert float(terms["loss"]) == pytest.approx(float(terms["loss_ce"]), rel=1e-6)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert not np.any(grads["pred_boxes"]) and not np.any(grads["pred_masks"])


def test_device_matcher_gives_the_same_losses():
    outputs, targets = synthetic(np.random.default_rng(5), num_aux=2)
    a = criterion(outputs, targets, config=MASKS_AUX)
    b = criterion(outputs, targets, config=dataclasses.replace(MASKS_AUX, matcher="device"))
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}


def test_cardinality_error_counts_non_empty_predictions():
    outputs, targets = synthetic(np.random.default_rng(6))
    no_object = outputs["pred_logits"].shape[-1] - 1
    outputs["pred_logits"][..., no_object] = 100.0           # everything predicted empty ...
    outputs["pred_logits"][0, :4, 0] = 200.0                 # ... but 4 queries of image 0
    terms = criterion(outputs, targets, config=LossConfig(aux_loss=False))
    # |4 - 2| + |0 - 0| + |0 - 3| over 3 images
    assert float(terms["cardinality_error"]) == pytest.approx(5 / 3, rel=1e-6)
    assert jnp.issubdtype(terms["loss"].dtype, jnp.floating)
