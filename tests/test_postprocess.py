"""Post-processing: the original's PostProcess / PostProcessSegm / PostProcessPanoptic, exactly
(panoptic: on every pixel that is not a float-rounding tie; on those too with the opt-in
PyTorch replay, `postprocess.torch_softmax`)."""
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import reference_arrays, reference_path
from detr_jax import postprocess as pp
from detr_jax.postprocess import panoptic, torch_softmax
from detr_jax.postprocess.resample import _bilinear_taps  # noqa: F401 (the taps the device pick uses)
from detr_jax.labels import panoptic_is_thing

FIXTURE_IS_THING = {i: i <= 90 for i in range(201)}  # the map the fixtures were made with
PRED = ["pred_logits", "pred_boxes", "pred_masks", "image_sizes", "orig_sizes"]
# (case, file with the inputs): batch inputs live only in the full fixture folder.
CASES = [("single", "forward_single.npz"), ("synthetic", "postprocess_synthetic.npz"),
         ("batch", "forward_batch.npz")]


def _load(case, source):
    inputs = reference_arrays(source, PRED)
    with np.load(reference_path(f"postprocess_{case}.npz")) as data:
        ref = {k: data[k] for k in data.files}
    summary = json.loads(reference_path("summary.json").read_text())["postprocess"][case]
    return inputs, ref, summary


def _segm_reference(ref, i, width):
    return np.unpackbits(ref[f"segm_masks_packbits_{i}"], axis=-1, count=width).astype(bool)


@pytest.fixture(scope="module", params=CASES, ids=[c for c, _ in CASES])
def case(request):
    return (request.param[0],) + _load(*request.param)


def test_boxes_scores_labels(case):
    _, x, ref, _ = case
    results = pp.postprocess_boxes(x["pred_logits"], x["pred_boxes"], x["orig_sizes"])
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["labels"], ref["bbox_labels"][i])
        np.testing.assert_allclose(r["scores"], ref["bbox_scores"][i], atol=1e-4)
        np.testing.assert_allclose(r["boxes"], ref["bbox_boxes_xyxy"][i], atol=1e-4)


def test_instance_masks_as_the_original(case):
    """crop=False is the original on any batch; crop=True equals it on unpadded images."""
    name, x, ref, _ = case
    original = pp.postprocess_instance_masks(x["pred_masks"], x["image_sizes"], x["orig_sizes"], crop=False)
    cropped = pp.postprocess_instance_masks(x["pred_masks"], x["image_sizes"], x["orig_sizes"])
    grid = x["pred_masks"].shape[-2:]
    for i, (size, orig) in enumerate(zip(x["image_sizes"], x["orig_sizes"])):
        expected = _segm_reference(ref, i, orig[1])
        assert original[i].dtype == bool and original[i].shape == expected.shape
        np.testing.assert_array_equal(original[i], expected)
        if tuple(pp.mask_grid_size(size)) == grid and (size == x["image_sizes"].max(0)).all():
            np.testing.assert_array_equal(cropped[i], expected)


def test_panoptic_as_the_original(case):
    """With the opt-in replay of PyTorch's softmax on tie pixels: every pixel is the original's."""
    name, x, ref, summary = case
    results = pp.postprocess_panoptic(x["pred_logits"], x["pred_masks"], x["image_sizes"], x["orig_sizes"],
                                      is_thing_map=FIXTURE_IS_THING, crop=False,
                                      tie_break=torch_softmax.torch_softmax_argmax)
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["id_map"], ref[f"panoptic_ids_{i}"])
        assert r["segments_info"] == summary["images"][i]["segments_info"]
        decoded = pp.png_to_ids(np.asarray(Image.open(io.BytesIO(ref[f"panoptic_png_{i}"].tobytes()))))
        np.testing.assert_array_equal(pp.panoptic_to_png(r["id_map"]), pp.panoptic_to_png(decoded))
        assert set(r["query_indices"]) <= set(ref[f"panoptic_threshold_kept_queries_{i}"])
        scores, labels = pp.class_scores(jnp.asarray(x["pred_logits"][i]), include_no_object=True)
        kept = np.flatnonzero((np.asarray(labels) != 250) & (np.asarray(scores) > 0.85))
        np.testing.assert_array_equal(kept, ref[f"panoptic_threshold_kept_queries_{i}"])


def tie_pixels(masks, image_size, orig_size, queries):
    """bool [H0, W0]: the pixels whose two top resampled logits among `queries` (each set of
    queries the pick ran over) are within NEAR_TIE_GAP, carried to the original size as the map is."""
    h, w = (int(v) for v in image_size)
    src = np.array(masks.shape[-2:])
    ties = np.zeros((h, w), bool)
    for chosen in queries:
        if len(chosen) > 1:
            resized = pp.resize_bilinear(masks[chosen][None], src[None], np.array([[h, w]]), (h, w))[0]
            ties |= panoptic._argmax_and_near_ties(np, resized)[1]
    rows = pp.pil_nearest_indices(h, int(orig_size[0]))
    cols = pp.pil_nearest_indices(w, int(orig_size[1]))
    return ties[rows[:, None], cols[None, :]]


def test_panoptic_default_is_the_original_on_every_pixel_but_ties(case):
    """The default pick (a tie goes to the first tied query): the original's segments and map on
    every pixel that is not a tie (`panoptic`'s docstring says which pixels are)."""
    name, x, ref, summary = case
    results = pp.postprocess_panoptic(x["pred_logits"], x["pred_masks"], x["image_sizes"], x["orig_sizes"],
                                      is_thing_map=FIXTURE_IS_THING, crop=False)
    for i, r in enumerate(results):
        expected = ref[f"panoptic_ids_{i}"]
        assert r["id_map"].shape == expected.shape
        kept_first = ref[f"panoptic_threshold_kept_queries_{i}"]
        ties = tie_pixels(x["pred_masks"][i], x["image_sizes"][i], x["orig_sizes"][i], [kept_first, r["query_indices"]])
        differ = r["id_map"] != expected
        assert not (differ & ~ties).any(), f"image {i}: {int((differ & ~ties).sum())} pixels differ away from ties"
        assert [s["category_id"] for s in r["segments_info"]] == \
            [s["category_id"] for s in summary["images"][i]["segments_info"]]


def test_panoptic_crop_equals_each_image_alone(case):
    """crop=True on a padded batch = each image's own grid region post-processed on its own (and on
    an unpadded single image the same as the original)."""
    name, x, ref, summary = case
    batch = pp.postprocess_panoptic(x["pred_logits"], x["pred_masks"], x["image_sizes"], x["orig_sizes"],
                                    is_thing_map=FIXTURE_IS_THING)
    masks = pp.postprocess_instance_masks(x["pred_masks"], x["image_sizes"], x["orig_sizes"])
    for i, (size, orig) in enumerate(zip(x["image_sizes"], x["orig_sizes"])):
        gh, gw = pp.mask_grid_size(size)
        alone = [a[i:i + 1] for a in (x["pred_logits"], x["pred_masks"][:, :, :gh, :gw], x["image_sizes"],
                                      x["orig_sizes"])]
        single = pp.postprocess_panoptic(*alone[:2], *alone[2:], is_thing_map=FIXTURE_IS_THING, crop=False)[0]
        np.testing.assert_array_equal(batch[i]["id_map"], single["id_map"])
        assert batch[i]["segments_info"] == single["segments_info"]
        single_masks = pp.postprocess_instance_masks(alone[1], alone[2], alone[3], crop=False)[0]
        np.testing.assert_array_equal(masks[i], single_masks)


def test_panoptic_corner_cases_of_the_synthetic_fixture():
    x, ref, summary = _load("synthetic", "postprocess_synthetic.npz")
    results = pp.postprocess_panoptic(x["pred_logits"], x["pred_masks"], x["image_sizes"], x["orig_sizes"],
                                      crop=False)  # the default is_thing map agrees with the fixture's
    areas = [s["area"] for s in results[0]["segments_info"]]
    assert min(areas) == 5                                   # area 5 survives, <= 4 is dropped
    assert not results[2]["segments_info"] and not results[2]["id_map"].any()  # nothing kept
    assert len(results[0]["scores"]) == len(results[0]["segments_info"])


def test_default_is_thing_agrees_with_the_fixture_map():
    assert all(panoptic_is_thing(i) == v for i, v in FIXTURE_IS_THING.items())
    assert pp.default_is_thing(1) and not pp.default_is_thing(184)


def test_png_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 2 ** 24 - 1]])
    rgb = pp.panoptic_to_png(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[1, 0], [0, 1, 0])
    np.testing.assert_array_equal(pp.png_to_ids(rgb), ids)
    with pytest.raises(ValueError):
        pp.panoptic_to_png(np.array([[2 ** 24]]))


# ---------------------------------------------------------------- building blocks against PyTorch

@pytest.mark.parametrize("grid, out", [((80, 121), (320, 481)), ((16, 24), (56, 96)), ((14, 21), (56, 81))])
def test_resize_bilinear_is_torch_bit_exactly(grid, out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(0, 5, (1, 3) + grid).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), out, mode="bilinear",
                                               align_corners=False).numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (0, 3), (0, 2)), constant_values=7.0)  # junk beyond the region
    sizes, targets, out_hw = [grid], [out], (out[0] + 5, out[1] + 3)
    on_host = pp.resize_bilinear(padded, sizes, targets, out_hw)
    jitted = jax.jit(pp.resize_bilinear, static_argnums=3)(jnp.asarray(padded), jnp.asarray(sizes),
                                                          jnp.asarray(targets), out_hw)
    for got in (on_host, np.asarray(jitted)):
        np.testing.assert_array_equal(got[:, :, :out[0], :out[1]], expected)


def test_nearest_is_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random((2, 37, 53)) > 0.5
    for out in ((100, 150), (74, 106), (20, 30), (37, 53)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(x)[None].float(), out, mode="nearest")[0]
        np.testing.assert_array_equal(pp.resize_nearest(x, out), expected.numpy().astype(bool))


@pytest.mark.parametrize("hw, out", [((800, 1066), (600, 800)), ((384, 512), (385, 513)), ((37, 53), (100, 7)),
                                     ((90, 140), (90, 140))])
def test_segment_map_resizes_like_the_originals_png_round_trip(hw, out):
    """ids -> panoptic PNG -> PIL NEAREST resize -> ids (the original) == ids picked by PIL's indices."""
    winner = np.random.default_rng(4).integers(0, 300, hw)
    png = Image.fromarray(pp.panoptic_to_png(winner)).resize(out[::-1], Image.NEAREST)
    np.testing.assert_array_equal(panoptic._segment_map(winner, [], out), pp.png_to_ids(np.asarray(png)))
    merged = panoptic._segment_map(winner, [[3, 7, 9]], out)
    assert not np.isin(merged, [7, 9]).any() and (merged == 3).sum() > (panoptic._segment_map(winner, [], out) == 3).sum()


def torch_kernel_or_skip():
    """torch, when this host's CPU softmax is the kernel `torch_softmax` replays; else skip."""
    torch = pytest.importorskip("torch")
    probe = np.random.default_rng(0).normal(0, 0.3, (40, 4096)).astype(np.float32)
    probe[1] = probe[0] + np.spacing(np.abs(probe[0])) * np.resize(np.float32([-1, 0, 1]), 4096)
    if not (torch_softmax.torch_softmax_argmax(probe) == torch.from_numpy(probe).T.softmax(-1).argmax(-1).numpy()).all():
        pytest.skip("this host's PyTorch CPU softmax rounds otherwise than the AVX-512 kernel torch_softmax "
                    "replays (another vector width or exp): the replay is not expected to match it here")
    return torch


def test_softmax_argmax_replays_torch_on_near_ties():
    torch = torch_kernel_or_skip()
    rng = np.random.default_rng(2)
    for k in (3, 16, 23, 40):
        x = rng.normal(0, 0.3, (k, 64, 64)).astype(np.float32)
        x[1] = x[0] + rng.integers(-2, 3, (64, 64)).astype(np.float32) * np.spacing(np.abs(x[0]))  # near ties
        expected = torch.from_numpy(x.reshape(k, -1)).T.softmax(-1).argmax(-1).numpy().reshape(64, 64)
        np.testing.assert_array_equal(torch_softmax.softmax_argmax(x), expected)


def test_softmax_argmax_is_the_plain_argmax_beyond_the_near_tie_gap():
    """Only pixels whose runner-up is within `_NEAR_TIE_GAP` of the top logit can change under
    torch's softmax; closer ones do change (so the replay is needed, and exercised)."""
    torch = torch_kernel_or_skip()
    rng = np.random.default_rng(3)
    for k in (3, 16, 23, 40):
        for scale in (0.05, 1.0, 30.0):
            x = rng.normal(0, scale, (k, 4096)).astype(np.float32)
            gaps = pp.NEAR_TIE_GAP * rng.choice([0.005, 0.02, 0.1, 0.5, 1.01, 1.5, 3.0, 10.0], 4096)
            x[0] = x.max(0)
            x[1] = x[0] + gaps.astype(np.float32)   # query 1 on top, query 0 the runner-up just under it
            torch_best = torch.from_numpy(x).T.softmax(-1).argmax(-1).numpy()
            srt = np.sort(x, axis=0)
            far = srt[-1] - srt[-2] > pp.NEAR_TIE_GAP
            np.testing.assert_array_equal(np.argmax(x, 0)[far], torch_best[far])
            np.testing.assert_array_equal(torch_softmax.softmax_argmax(x.reshape(k, 64, 64)).ravel(), torch_best)
            if scale < 1 and k > 3:
                assert (np.argmax(x, 0) != torch_best).any(), "near ties should change some pixels"


def test_device_pick_is_argmax_over_the_resampled_subset_with_ties_to_the_first():
    """`_pick` finishes the resampling block by block (`_column_pass_of`, then rows) and takes the
    argmax there: the same as the argmax over `resize_bilinear`'s whole output; `_logits_at` gives
    those resampled logits bit for bit at any pixels."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (8, 32, 48)).astype(np.float32)
    x[5] = x[2]                                   # exact ties: the earlier row wins
    x[6, :8] = x[2, :8] + pp.NEAR_TIE_GAP / 2    # near ties
    src, size, out_hw = np.array([30, 45]), np.array([70, 101]), (100, 128)   # 100 rows: 4 blocks, the last padded
    subset = np.array([1, 2, 5, 6])
    rows = np.full(8, -1, np.int32)
    rows[subset] = np.arange(len(subset), dtype=np.int32)
    across, taps = panoptic._column_pass_of(x, src, size, out_hw)
    best, near = jax.device_get(panoptic._pick(across, taps, jnp.asarray(rows)))
    resized = pp.resize_bilinear(x[None], src[None], size[None], out_hw)[0]      # numpy, whole
    want_best, want_near = panoptic._argmax_and_near_ties(np, resized[subset])
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_array_equal(near, want_near)
    assert near[:16].any() and not near[:16].all() and (best == 1).any()
    pixel_rows, pixel_cols = rng.integers(0, 70, 500), rng.integers(0, 101, 500)
    np.testing.assert_array_equal(panoptic._logits_at(across, taps, pixel_rows, pixel_cols),
                                  resized[:, pixel_rows, pixel_cols])


def test_narrowing_the_kept_masks_equals_torchs_softmax_argmax_over_the_rest():
    """The small-segment loop's re-pick (`_KeptMasks.narrowed`): only the pixels of dropped
    winners and near ties are redone, and the map is torch's softmax argmax over the masks left,
    through two narrowings, with near ties between kept masks and between a dropped and a kept one."""
    torch = torch_kernel_or_skip()
    rng = np.random.default_rng(5)
    k, h, w = 12, 40, 56
    x = rng.normal(0, 0.05, (k, h, w)).astype(np.float32)
    x[3] = x[7] + rng.integers(-2, 3, (h, w)).astype(np.float32) * np.spacing(np.abs(x[7]))   # 3 and 7: kept, tied
    x[5, :10] = x.max(0)[:10] + 1.0                                                # 5 wins a band, then is dropped
    x[9, :10] = x[5, :10] - pp.NEAR_TIE_GAP / 4                                   # 9 just under 5 there
    kept = panoptic._KeptMasks(x, np.array([h, w]), (h, w), torch_softmax.torch_softmax_argmax)   # at the output size
    subset = np.arange(k)
    winner, unsure = kept.softmax_argmax(subset)
    torch_argmax = lambda rows: torch.from_numpy(x[rows].reshape(len(rows), -1)).T.softmax(-1).argmax(-1).numpy()  # noqa: E731
    np.testing.assert_array_equal(winner.ravel(), torch_argmax(subset))
    for drop in ([5, 0], [9, 2, 11]):
        keep = ~np.isin(subset, drop)
        winner, unsure = kept.narrowed(winner, unsure, subset, keep)
        subset = subset[keep]
        np.testing.assert_array_equal(winner.ravel(), torch_argmax(subset))
        assert winner.max() == len(subset) - 1 and unsure.mean() < 0.7
    winner, unsure = kept.narrowed(winner, unsure, subset, subset == 3)
    assert not winner.any() and not unsure.any()
    winner, unsure = kept.narrowed(winner, unsure, subset[subset == 3], np.zeros(1, bool))   # none left
    assert winner.shape == (h, w) and not winner.any() and not unsure.any()


def test_narrowing_by_default_equals_the_plain_argmax_over_the_rest():
    """Without the replay, the re-pick of the small-segment loop is the argmax (first on ties)
    over the masks left, as a pick from scratch over them would be."""
    rng = np.random.default_rng(6)
    k, h, w = 9, 24, 40
    x = rng.normal(0, 0.05, (k, h, w)).astype(np.float32)
    x[4] = x[2]                                                  # exact ties: 2 wins, then 4 once 2 is dropped
    x[6, :6] = x.max(0)[:6] + 1.0
    kept = panoptic._KeptMasks(x, np.array([h, w]), (h, w))
    subset = np.arange(k)
    winner, unsure = kept.softmax_argmax(subset)
    np.testing.assert_array_equal(winner, np.argmax(x, 0))
    for drop in ([6, 2], [0, 8]):
        keep = ~np.isin(subset, drop)
        winner, unsure = kept.narrowed(winner, unsure, subset, keep)
        subset = subset[keep]
        np.testing.assert_array_equal(winner, np.argmax(x[subset], 0))


def test_instance_masks_jit_with_traced_sizes():
    """Sizes are data, not shapes: one compilation serves every image size of a mask grid."""
    x = reference_arrays("postprocess_synthetic.npz", ["pred_masks", "image_sizes"])
    out_hw = (64, 96)
    traced = jax.jit(pp.instance_masks, static_argnames="out_hw")(x["pred_masks"], x["image_sizes"], out_hw=out_hw)
    logits = pp.resize_bilinear(x["pred_masks"], pp.mask_grid_size(x["image_sizes"]), x["image_sizes"], out_hw)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(jax.nn.sigmoid(logits)) > 0.5)
    assert traced.shape == (3, 100) + out_hw and traced.dtype == bool
