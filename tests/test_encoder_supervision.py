"""The encoder's dense supervision (`detr_jax.encoder_supervision`): which token learns which
target, and the loss it gets.  Its training run (exported model plain DETR) is in
test_training_queries.py, with the other accelerators."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.config import LossConfig, ModelConfig, TrainConfig
from detr_jax.encoder_supervision import EncoderSupervision, build, dense_assignment, token_centers
from detr_jax.losses import NO_LOSS, assigned_criterion


def targets_of(boxes, valid=None, sample_valid=None):
    boxes = np.asarray(boxes, np.float32)
    valid = np.ones(boxes.shape[:2], bool) if valid is None else np.asarray(valid)
    out = {"labels": np.arange(boxes.shape[1], dtype=np.int32)[None].repeat(boxes.shape[0], 0), "boxes": boxes,
           "valid": valid}
    if sample_valid is not None:
        out["sample_valid"] = np.asarray(sample_valid)
    return out


def grid_of(slots, h=4, w=4):
    return np.asarray(slots).reshape(-1, h, w)


def test_token_centers_are_cell_centers_in_each_images_own_coordinates():
    # a 64x64 image and a 64x32 one (padded to 64x64), on the 4x4 grid of stride 16
    centers, cells, inside = token_centers(jnp.array([[64, 64], [64, 32]]), (4, 4), (64, 64))
    np.testing.assert_allclose(centers[0, :4, 0], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(centers[0, ::4, 1], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(centers[1, :4, 0], [0.25, 0.75, 1.25, 1.75])    # the narrow image's x
    np.testing.assert_allclose(cells, [[0.25, 0.25], [0.5, 0.25]])
    assert inside[0].all() and grid_of(inside[1])[:, :, :2].all() and not grid_of(inside[1])[:, :, 2:].any()


def test_a_token_learns_the_smallest_box_over_its_center_and_a_tiny_object_gets_the_cell_of_its_center():
    centers, cells, inside = token_centers(jnp.array([[64, 64]]), (4, 4), (64, 64))
    boxes = [[[0.5, 0.5, 1.0, 1.0],            # slot 0: the whole image
              [0.25, 0.25, 0.5, 0.5],          # slot 1: the top-left quarter (4 tokens)
              [0.70, 0.80, 0.05, 0.05]]]       # slot 2: inside one cell, over no token's center
    slots = grid_of(dense_assignment(centers, cells, inside, targets_of(boxes)))[0]
    expected = np.zeros((4, 4), int)
    expected[:2, :2] = 1
    expected[3, 2] = 2                          # the cell holding (0.70, 0.80)
    np.testing.assert_array_equal(slots, expected)


def test_tokens_off_the_image_padded_slots_and_filler_rows_get_no_loss_and_the_rest_no_object():
    centers, cells, inside = token_centers(jnp.array([[64, 32], [64, 64]]), (4, 4), (64, 64))
    boxes = [[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]] * 2
    targets = targets_of(boxes, valid=[[True, False], [True, True]], sample_valid=[True, False])
    slots = grid_of(dense_assignment(centers, cells, inside, targets))
    assert (slots[0, :, 2:] == NO_LOSS).all()             # off the 32-pixel-wide image
    assert set(np.unique(slots[0, :, :2])) == {0, -1}     # the padded whole-image slot teaches nothing
    assert (slots[1] == NO_LOSS).all()                    # a filler row


def test_no_object_tokens_weigh_eos_coef_in_the_cross_entropy_and_no_loss_tokens_nothing():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    boxes = jnp.full((1, 4, 4), 0.5)
    targets = {"labels": jnp.array([[1]]), "boxes": jnp.array([[[0.5, 0.5, 0.2, 0.2]]]), "valid": jnp.array([[True]])}
    assignment = jnp.array([[0, -1, NO_LOSS, -1]])
    terms = assigned_criterion({"pred_logits": logits, "pred_boxes": boxes}, targets, assignment,
                               LossConfig(aux_loss=False), eos_coef=0.1)
    expected = (-np.log(0.25) - 0.1 * np.log(0.6) - 0.1 * np.log(0.4)) / 1.2
    np.testing.assert_allclose(terms["loss_ce"], expected, rtol=1e-6)
    np.testing.assert_allclose(terms["loss_bbox"], 0.6, rtol=1e-6)      # |0.2 - 0.5| twice, one assigned token
    without = assigned_criterion({"pred_logits": logits, "pred_boxes": boxes}, targets, assignment,
                                 LossConfig(aux_loss=False))
    np.testing.assert_allclose(without["loss_ce"], -np.log(0.25), rtol=1e-6)   # the denoising default: eos 0


def test_the_head_is_built_for_the_detector_only_and_its_loss_reaches_the_encoder_output():
    model = ModelConfig(backbone="convnet_small", num_classes=3, hidden_dim=16, num_heads=2)
    assert build(TrainConfig(), model) is None
    assert build(TrainConfig(encoder_supervision=1.0, stage="masks"), model) is None
    with pytest.raises(ValueError):
        build(TrainConfig(encoder_supervision=-1.0), model)
    supervision = build(TrainConfig(encoder_supervision=2.0), model)
    assert supervision == EncoderSupervision(model, 2.0)
    params = supervision.init_params(jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape, supervision.abstract_params())

    memory = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 16))
    targets = targets_of([[[0.3, 0.3, 0.4, 0.4]]])
    loss = lambda m: supervision.criterion(params, m, jnp.ones((1, 64, 64), bool), targets, LossConfig())["loss_enc"]  # noqa: E731
    value, grad = jax.value_and_grad(loss)(memory)
    assert np.isfinite(value) and value > 0
    assert np.abs(np.asarray(grad)).reshape(16, 16).sum(-1).min() > 0     # every token has a loss
