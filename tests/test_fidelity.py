"""The acceptance test of the model and the converter: a converted checkpoint computes what the
original PyTorch DETR computed, number by number (fixtures in ../shared/fixtures/detr_reference).

Tolerances (from the issue and the fixture README): max abs error <= 1e-4, relative 1e-4 where
magnitudes are large (logits reach |100| by design); fp16-stored masks of the large image ~1e-2.
"""
import numpy as np
import pytest

from conftest import reference_arrays
from detr_jax.data.preprocess import normalize

ATOL, RTOL = 1e-4, 1e-4


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL, per_row=False):
    """|actual - expected| <= atol + rtol * magnitude, the magnitude being |expected| elementwise,
    or with `per_row` the max |expected| of each last-axis row (a query's logits: one logit near 0
    is the sum of 256 terms as large as the row's others, so it carries their rounding)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    magnitude = np.abs(expected).max(axis=-1, keepdims=True) if per_row else np.abs(expected)
    excess = np.abs(actual - expected) - (atol + rtol * magnitude)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"{name}: |diff| {abs(actual[worst] - expected[worst]):.3g} at {worst} "
                               f"(ref {expected[worst]:.4g}) exceeds {atol} + {rtol} * |ref|")


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def single_inputs():
    ref = reference_arrays("forward_single.npz", ["image_resized_uint8_0", "pixel_mask"])
    pixel_values = normalize(ref["image_resized_uint8_0"])[None]
    return pixel_values, ~ref["pixel_mask"]          # the original's mask is True on padding


def assert_outputs_match(out, ref, batch_index=slice(None)):
    assert_close(out["pred_logits"], ref["pred_logits"][batch_index], "pred_logits", per_row=True)
    assert_close(out["pred_boxes"], ref["pred_boxes"][batch_index], "pred_boxes")
    assert_close(out["pred_masks"], ref["pred_masks"][batch_index], "pred_masks")
    assert len(out["aux_outputs"]) == 5
    for layer, aux in enumerate(out["aux_outputs"]):
        assert_close(aux["pred_logits"], ref["aux_pred_logits"][layer][batch_index], f"aux {layer} pred_logits",
                     per_row=True)
        assert_close(aux["pred_boxes"], ref["aux_pred_boxes"][layer][batch_index], f"aux {layer} pred_boxes")


def test_single_image_outputs_match_the_original(reference_model):
    ref = reference_arrays("forward_single.npz", ["pred_logits", "pred_boxes", "pred_masks", "aux_pred_logits",
                                                  "aux_pred_boxes"])
    pixel_values, pixel_mask = single_inputs()
    out = reference_model(pixel_values, pixel_mask)
    assert out["pred_logits"].shape == (1, 100, 251)
    assert out["pred_masks"].shape == (1, 100, 80, 121)
    assert_outputs_match(out, ref)


def test_the_accelerator_policy_matches_the_original_too(converted_dir):
    """Dense attention and the whole batch in one program (what runs on a GPU or TPU), on the CPU:
    the same numbers as the CPU policy's blocked attention."""
    import detr_jax

    model = detr_jax.load(converted_dir, policy="accelerator")
    assert model.config.attention == "dense"
    ref = reference_arrays("forward_single.npz", ["pred_logits", "pred_boxes", "pred_masks", "aux_pred_logits",
                                                  "aux_pred_boxes"])
    assert_outputs_match(model(*single_inputs()), ref)


def test_single_image_intermediates_match_the_original(reference_model):
    ref = reference_arrays("forward_single.npz")
    if "memory" not in ref:
        pytest.skip("intermediate activations are only in the full fixture folder (set DETR_REFERENCE_DIR)")
    _, inter = reference_model.with_intermediates(nhwc(ref["input"]), ~ref["pixel_mask"])
    for i in range(1, 5):
        stored = nhwc(ref[f"backbone_layer{i}"])     # only the first channels are stored
        assert_close(inter[f"backbone_layer{i}"][..., :stored.shape[-1]], stored, f"backbone_layer{i}")
    np.testing.assert_array_equal(np.asarray(inter["feature_mask"]), ~ref["backbone_mask_layer4"])
    assert_close(inter["position_embedding"], nhwc(ref["pos_layer4"]), "pos_layer4")
    assert_close(inter["projected"], nhwc(ref["input_proj"]), "input_proj")
    assert_close(inter["memory"], nhwc(ref["memory"]), "memory")
    assert_close(inter["decoder_hs"], ref["decoder_hs"], "decoder_hs")
    assert_close(inter["attention_maps"], ref["bbox_attention"], "bbox_attention")


def test_padded_batch_in_original_semantics_matches_the_original(reference_model):
    ref = reference_arrays("forward_batch.npz")
    out, inter = reference_model.with_intermediates(nhwc(ref["input"]), ~ref["pixel_mask"], padding_invariant=False)
    assert_outputs_match(out, ref)
    np.testing.assert_array_equal(np.asarray(inter["feature_mask"]), ~ref["backbone_mask_layer4"])
    assert_close(inter["position_embedding"], nhwc(ref["pos_layer4"]), "pos_layer4")
    assert_close(inter["memory"], nhwc(ref["memory"]), "memory")
    assert_close(inter["decoder_hs"], ref["decoder_hs"], "decoder_hs")


def test_padding_invariant_batch_equals_each_image_alone(reference_model):
    """The default mode: an image padded into a batch gives exactly what it gives alone."""
    ref = reference_arrays("forward_batch.npz", ["input", "pixel_mask", "image_sizes", "pred_logits"])
    pixel_values, pixel_mask = nhwc(ref["input"]), ~ref["pixel_mask"]
    batch = reference_model(pixel_values, pixel_mask)
    for b, (h, w) in enumerate(ref["image_sizes"]):
        alone = reference_model(pixel_values[b:b + 1, :h, :w], pixel_mask[b:b + 1, :h, :w])
        mh, mw = alone["pred_masks"].shape[2:]
        assert_close(batch["pred_logits"][b], alone["pred_logits"][0], f"image {b} logits", per_row=True)
        assert_close(batch["pred_boxes"][b], alone["pred_boxes"][0], f"image {b} boxes", atol=1e-5)
        assert_close(batch["pred_masks"][b, :, :mh, :mw], alone["pred_masks"][0], f"image {b} masks", atol=1e-4)
    # ...whereas the original's semantics let padding change the padded image's outputs.
    original = reference_model(pixel_values, pixel_mask, padding_invariant=False)
    assert np.abs(np.asarray(original["pred_logits"][1]) - np.asarray(batch["pred_logits"][1])).max() > 1.0


@pytest.mark.slow
def test_large_image_at_inference_size_matches_the_original(reference_model):
    ref = reference_arrays("forward_large.npz")
    out = reference_model(nhwc(ref["input"]), ~ref["pixel_mask"])
    assert_close(out["pred_logits"], ref["pred_logits"], "pred_logits", per_row=True)
    assert_close(out["pred_boxes"], ref["pred_boxes"], "pred_boxes")
    masks = np.asarray(out["pred_masks"])[:, ref["pred_masks_query_indices"]]
    # stored as float16 (values up to ~10): fp16 rounding is ~5e-3 there
    assert_close(masks, ref["pred_masks"].astype(np.float32), "pred_masks (fp16 reference)", atol=1e-2, rtol=0)


def test_mask_head_on_the_best_queries_only_is_exact_for_them(reference_model):
    """`mask_queries=K`: the selected queries' masks equal the full run's, the others are skipped."""
    pixel_values, pixel_mask = single_inputs()
    full = reference_model(pixel_values, pixel_mask)
    top = reference_model(pixel_values, pixel_mask, mask_queries=32)
    kept = reference_arrays("postprocess_single.npz", ["panoptic_threshold_kept_queries_0"])
    selected = np.asarray(top["mask_query_indices"][0])
    assert set(kept["panoptic_threshold_kept_queries_0"]) <= set(selected)   # all 23 kept queries are in
    assert float(top["mask_score_cutoff"][0]) < 0.85                         # ...and the model says so
    assert_close(top["pred_masks"][0, selected], full["pred_masks"][0, selected], "selected masks")
    others = np.setdiff1d(np.arange(100), selected)
    assert (np.asarray(top["pred_masks"][0, others]) == -1e4).all()
    np.testing.assert_array_equal(np.asarray(top["pred_logits"]), np.asarray(full["pred_logits"]))


def test_mask_head_on_the_queries_over_a_threshold_is_exact_for_them(reference_model):
    """`mask_threshold=t`: two calls (the model without its mask head, then the mask head on the
    queries over t, their count rounded up to a multiple of 8): the kept queries' masks equal the
    full run's, the others are MASK_FILL, everything else is unchanged."""
    pixel_values, pixel_mask = single_inputs()
    full = reference_model(pixel_values, pixel_mask)
    out = reference_model(pixel_values, pixel_mask, mask_threshold=0.85)
    kept = reference_arrays("postprocess_single.npz", ["panoptic_threshold_kept_queries_0"])
    selected = np.asarray(out["mask_query_indices"][0])
    assert len(selected) == 24                                                # 23 pass -> 24
    assert set(kept["panoptic_threshold_kept_queries_0"]) <= set(selected)
    assert_close(out["pred_masks"][0, selected], full["pred_masks"][0, selected], "selected masks")
    others = np.setdiff1d(np.arange(100), selected)
    assert (np.asarray(out["pred_masks"][0, others]) == -1e4).all()
    for key in ("pred_logits", "pred_boxes"):
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(full[key]))
