"""The Hungarian matcher: the original's assignments on the loss fixtures, both solvers, and
scipy agreement, jit and vmap on random problems."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from conftest import reference_arrays

from detr_jax import matcher

LOSS_CASES = ["loss_masks.npz", "loss_masks_zero.npz", "loss_detection_zero.npz",
              "loss_detection_all_zero.npz"]
AUX_LAYERS = 5


def load_loss_case(name):
    """A loss fixture as (fixture arrays, outputs, padded targets, layer names).

    Targets are padded to the batch's largest object count (valid first); masks are zero-padded
    bottom/right to the batch's largest mask size, as the original pads them.  `layers` lists
    (fixture name, outputs index): "final", then "aux0".."aux4" when the case has aux outputs.
    """
    ref = reference_arrays(name)
    batch = ref["pred_logits"].shape[0]
    counts = [len(ref[f"target_labels_{b}"]) for b in range(batch)]
    slots = max(counts)
    targets = {"labels": np.zeros((batch, slots), np.int32),
               "boxes": np.zeros((batch, slots, 4), np.float32),
               "valid": np.zeros((batch, slots), bool)}
    for b, n in enumerate(counts):
        targets["labels"][b, :n] = ref[f"target_labels_{b}"]
        targets["boxes"][b, :n] = ref[f"target_boxes_{b}"]
        targets["valid"][b, :n] = True
    outputs = {"pred_logits": ref["pred_logits"], "pred_boxes": ref["pred_boxes"]}
    if "pred_masks" in ref:
        outputs["pred_masks"] = ref["pred_masks"]
        sizes = np.array([ref[f"target_masks_{b}"].shape[1:] for b in range(batch)])
        masks = np.zeros((batch, slots) + tuple(sizes.max(axis=0)), np.uint8)
        for b in range(batch):
            m = ref[f"target_masks_{b}"]
            masks[b, :m.shape[0], :m.shape[1], :m.shape[2]] = m
        targets["masks"] = masks
    layers = ["final"]
    if "aux_pred_logits" in ref:
        outputs["aux_outputs"] = [{"pred_logits": ref["aux_pred_logits"][i],
                                   "pred_boxes": ref["aux_pred_boxes"][i]}
                                  for i in range(AUX_LAYERS)]
        layers += [f"aux{i}" for i in range(AUX_LAYERS)]
    return ref, outputs, targets, layers


def layer_outputs(outputs, layer):
    """The outputs of one named decoder layer ("final" or "aux<i>")."""
    return outputs if layer == "final" else outputs["aux_outputs"][int(layer[3:])]


def assert_same_pairs(match, ref, layer):
    for b, (src, tgt) in enumerate(matcher.match_indices(match)):
        where = f"{layer} image {b}"
        np.testing.assert_array_equal(src, ref[f"match_{layer}_src_{b}"], err_msg=where)
        np.testing.assert_array_equal(tgt, ref[f"match_{layer}_tgt_{b}"], err_msg=where)


@pytest.mark.parametrize("method", ["scipy", "device"])
@pytest.mark.parametrize("name", LOSS_CASES)
def test_matches_the_original_on_every_layer(name, method):
    ref, outputs, targets, layers = load_loss_case(name)
    match_fn = jax.jit(functools.partial(matcher.hungarian_match, method=method))
    for layer in layers:
        out = layer_outputs(outputs, layer)
        match = match_fn({k: out[k] for k in ("pred_logits", "pred_boxes")}, targets)
        assert match.dtype == jnp.int32 and match.shape == out["pred_logits"].shape[:2]
        assert_same_pairs(match, ref, layer)


def test_cost_matrix_matches_a_hand_computation():
    logits = np.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]], np.float32)      # B=1, Q=2, C+1=3
    boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]]], np.float32)
    targets = {"labels": np.array([[1, 0]]), "valid": np.array([[True, False]]),
               "boxes": np.array([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]], np.float32)}
    cost = np.asarray(jax.jit(matcher.match_cost)({"pred_logits": logits, "pred_boxes": boxes},
                                                  targets, 1.0, 5.0, 2.0))
    prob = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    # query 0 equals the target box: L1 0, GIoU 1
    assert cost[0, 0, 0] == pytest.approx(-prob[0, 1] - 2.0, rel=1e-6)
    # query 1 (xyxy 0.2, 0.1, 0.4, 0.5) vs target (0.4, 0.4, 0.6, 0.6): touching, IoU 0;
    # enclosing 0.4 x 0.5, union 0.08 + 0.04
    giou = 0.0 - (0.2 - 0.12) / 0.2
    expected = 5.0 * (0.2 + 0.2 + 0.0 + 0.2) - prob[1, 1] - 2.0 * giou
    assert cost[0, 1, 0] == pytest.approx(expected, rel=1e-5)
    assert np.all(np.isfinite(cost))                                  # padded slot: no NaN


def random_problem(rng, batch=12, queries=7, slots=5, logits=4):
    """Random outputs and padded targets; image b has b % (slots + 1) objects."""
    counts = [b % (slots + 1) for b in range(batch)]
    valid = np.arange(slots)[None, :] < np.array(counts)[:, None]
    centers = rng.uniform(0.2, 0.8, (batch, queries + slots, 2))
    sizes = rng.uniform(0.05, 0.4, (batch, queries + slots, 2))
    boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
    outputs = {"pred_logits": rng.normal(size=(batch, queries, logits)).astype(np.float32),
               "pred_boxes": boxes[:, :queries]}
    targets = {"labels": rng.integers(0, logits - 1, (batch, slots)).astype(np.int32),
               "boxes": np.where(valid[..., None], boxes[:, queries:], 0.0).astype(np.float32),
               "valid": valid}
    return outputs, targets


def scipy_reference(outputs, targets):
    """The original's procedure: per image, scipy on the cost restricted to the valid targets."""
    cost = np.asarray(jax.jit(matcher.match_cost)(outputs, targets))
    expected = np.full(cost.shape[:2], -1)
    for b in range(cost.shape[0]):
        n = int(targets["valid"][b].sum())
        rows, cols = scipy.optimize.linear_sum_assignment(cost[b, :, :n])
        expected[b, rows] = cols
    return expected


@pytest.mark.parametrize("queries,slots", [(7, 5), (4, 6)])     # M <= Q and M > Q
@pytest.mark.parametrize("method", ["scipy", "device"])
def test_agrees_with_scipy_and_never_matches_padding(method, queries, slots):
    outputs, targets = random_problem(np.random.default_rng(queries), queries=queries, slots=slots)
    match = np.asarray(jax.jit(functools.partial(matcher.hungarian_match, method=method))(
        outputs, targets))
    np.testing.assert_array_equal(match, scipy_reference(outputs, targets))
    num_matched = (match >= 0).sum(axis=1)
    np.testing.assert_array_equal(num_matched, np.minimum(targets["valid"].sum(1), queries))
    assert np.all(match[targets["valid"].sum(1) == 0] == -1)        # zero-object images


@pytest.mark.parametrize("queries,slots", [(9, 6), (5, 8)])
def test_device_solver_is_optimal_with_many_ties(queries, slots):
    """Small integer costs (many tied optima): the device solver's total equals scipy's, with
    min(Q, #valid) pairs and padded slots never matched."""
    rng = np.random.default_rng(slots)
    cost = rng.integers(0, 4, (32, queries, slots)).astype(np.float32)
    valid = np.arange(slots)[None] < rng.integers(0, slots + 1, 32)[:, None]
    scipy_match = np.asarray(matcher.assign(cost, valid, "scipy"))
    device_assign = jax.jit(functools.partial(matcher.assign, method="device"))
    device_match = np.asarray(device_assign(cost, valid))
    for b in range(32):
        n = int(valid[b].sum())
        rows, cols = scipy.optimize.linear_sum_assignment(cost[b, :, :n])
        for match in (scipy_match[b], device_match[b]):
            src = np.flatnonzero(match >= 0)
            assert len(src) == min(queries, n) and np.all(match[src] < n)
            assert len(set(match[src])) == len(src)
            assert cost[b, src, match[src]].sum() == cost[b, rows, cols].sum()


@pytest.mark.parametrize("method", ["scipy", "device"])
def test_vmap_over_the_batch_and_over_layers(method):
    outputs, targets = random_problem(np.random.default_rng(3))
    match_fn = jax.jit(functools.partial(matcher.hungarian_match, method=method))
    batched = np.asarray(match_fn(outputs, targets))

    def one_image(out, tgt):
        add_batch = functools.partial(jax.tree.map, lambda x: x[None])
        return match_fn(add_batch(out), add_batch(tgt))[0]

    per_image = jax.jit(jax.vmap(one_image))(outputs, targets)
    np.testing.assert_array_equal(per_image, batched)
    flipped = jax.tree.map(lambda x: x[:, ::-1], outputs)                # queries reversed
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), outputs, flipped)  # two "layers"
    layers = np.asarray(jax.jit(jax.vmap(match_fn, in_axes=(0, None)))(stacked, targets))
    np.testing.assert_array_equal(layers[0], batched)
    np.testing.assert_array_equal(layers[1], batched[:, ::-1])


def test_empty_target_arrays_and_index_pairs():
    outputs, _ = random_problem(np.random.default_rng(4), batch=2)
    empty = {"labels": np.zeros((2, 0), np.int32), "boxes": np.zeros((2, 0, 4), np.float32),
             "valid": np.zeros((2, 0), bool)}
    match = jax.jit(matcher.hungarian_match)(outputs, empty)
    assert match.shape == (2, 7) and np.all(np.asarray(match) == -1)
    pairs = matcher.match_indices(np.array([[-1, 2, -1, 0], [-1, -1, -1, -1]]))
    np.testing.assert_array_equal(pairs[0][0], [1, 3])
    np.testing.assert_array_equal(pairs[0][1], [2, 0])
    assert pairs[1][0].size == 0 and pairs[1][0].dtype == np.int64


def test_non_finite_costs_still_give_a_one_to_one_match():
    """Diverged outputs (NaN boxes) reach the matcher before the train loop's non-finite loss
    check: the scipy matcher still returns one query per valid slot instead of failing inside
    the callback."""
    outputs, targets = random_problem(np.random.default_rng(5), batch=3)   # 0, 1 and 2 objects
    outputs = dict(outputs, pred_boxes=np.asarray(outputs["pred_boxes"]).copy())
    outputs["pred_boxes"][1, :3] = np.nan
    outputs["pred_boxes"][2] = np.inf
    match = np.asarray(jax.jit(matcher.hungarian_match)(outputs, targets))
    for row, valid in zip(match, np.asarray(targets["valid"])):
        assert sorted(row[row >= 0]) == list(np.flatnonzero(valid))
    assert (match[1:] >= 0).sum() == 3
