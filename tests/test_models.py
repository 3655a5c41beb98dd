"""The Flax modules on tiny configs: contracts, PyTorch-exact pieces and padding invariance."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_images
from detr_jax.config import load_config
from detr_jax.models import DETR, init_variables
from detr_jax.models.layers import nearest_indices, nearest_resize
from detr_jax.models.position import sine_position_embedding
from detr_jax.models.segmentation import GroupNorm, pixel_sums
from detr_jax.runtime import DETRModel

TINY = load_config("detr_tiny").model


@pytest.fixture(scope="module")
def tiny_model():
    return DETRModel(TINY, init_variables(TINY, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def tiny_dc5_model():
    config = dataclasses.replace(TINY, dilation=True)
    return DETRModel(config, init_variables(config, jax.random.PRNGKey(1)))


@pytest.fixture(scope="module")
def tiny_convnet_model():
    config = dataclasses.replace(TINY, backbone="convnet_small")
    return DETRModel(config, init_variables(config, jax.random.PRNGKey(2)))


def test_output_contract(tiny_model):
    x, mask = random_images([(64, 80), (50, 70)], (64, 96))
    out = tiny_model(x, mask)
    q, c = TINY.num_queries, TINY.num_classes + 1
    assert out["pred_logits"].shape == (2, q, c)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert out["pred_masks"].shape == (2, q, 16, 24)               # stride 4 of the padded batch
    assert len(out["aux_outputs"]) == TINY.dec_layers - 1
    boxes = np.asarray(out["pred_boxes"])
    assert ((boxes > 0) & (boxes < 1)).all()


def test_buffers_hold_the_frozen_batchnorm_and_are_not_params(tiny_model):
    buffers = tiny_model.variables["buffers"]["backbone"]["bn1"]
    assert set(buffers) == {"weight", "bias", "running_mean", "running_var"}
    assert "bn1" not in tiny_model.variables["params"]["backbone"]


@pytest.mark.parametrize("in_size,out_size", [(320, 20), (481, 31), (480, 30), (31, 62), (20, 40), (13, 7), (7, 13),
                                              (1185, 75), (800, 50), (61, 121)])
def test_nearest_indices_equal_torch_interpolate(in_size, out_size):
    torch = pytest.importorskip("torch")
    src = torch.arange(in_size, dtype=torch.float32)[None, None, :, None]
    expected = torch.nn.functional.interpolate(src, size=(out_size, 1)).flatten().long().numpy()
    np.testing.assert_array_equal(nearest_indices(in_size, out_size), expected)


def test_nearest_resize_of_a_mask_picks_torchs_rows():
    mask = jnp.arange(12 * 9).reshape(1, 12, 9)
    out = nearest_resize(mask, (5, 4))
    np.testing.assert_array_equal(out[0], np.asarray(mask[0])[nearest_indices(12, 5)][:, nearest_indices(9, 4)])


@pytest.mark.parametrize("in_size,out_size", [(134, 267), (20, 40), (100, 99), (7, 7), (13, 7), (7, 13), (61, 121)])
def test_nearest_resize_equals_the_gather_of_torchs_indices_values_and_gradients(in_size, out_size):
    # integer upsamplings (and identities or crops) take a repeat path; the rest a gather
    x = jax.random.normal(jax.random.PRNGKey(0), (2, in_size, 3, 4))
    gather = lambda x: jnp.take(x, nearest_indices(in_size, out_size), axis=1)  # noqa: E731
    ours = lambda x: nearest_resize(x, (out_size, 3))  # noqa: E731
    np.testing.assert_array_equal(ours(x), gather(x))
    weights = jax.random.normal(jax.random.PRNGKey(1), (2, out_size, 3, 4))
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights))(x)  # noqa: E731
    np.testing.assert_allclose(grad(ours), grad(gather), rtol=1e-6, atol=1e-6)


def test_query_embeddings_start_as_torchs_standard_normal(tiny_model):
    # nn.Embedding's N(0, 1), not flax's 1/sqrt(d): small queries never specialize from scratch.
    # The tiny model's 12 x 128 draws (std 0.98) tell N(0, 1) from flax's std 1/sqrt(128) = 0.09
    # as well as 100 queries would, without compiling the init of another model
    queries = tiny_model.variables["params"]["query_embed"]["embedding"]
    assert queries.shape == (TINY.num_queries, TINY.hidden_dim) and 0.95 < float(np.std(queries)) < 1.05


def test_position_embedding_depends_only_on_the_valid_region():
    full = jnp.ones((1, 6, 9), bool)
    padded = jnp.zeros((1, 8, 12), bool).at[:, :6, :9].set(True)
    a = sine_position_embedding(full)
    b = sine_position_embedding(padded)[:, :6, :9]
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (1, 6, 9, 256)
    # channel 0 is sin(y) with y the normalized row coordinate in (0, 2*pi]: row i -> 2*pi*(i+1)/6
    rows = 2 * np.pi * np.arange(1, 7) / (6 + 1e-6)
    np.testing.assert_allclose(a[0, :, 0, 0], np.sin(rows), atol=1e-5)
    np.testing.assert_allclose(a[0, 0, :, 128 + 1], np.cos(2 * np.pi * np.arange(1, 10) / (9 + 1e-6)), atol=1e-5)


def test_group_norm_equals_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, 5, 7, 16)).astype(np.float32) * 3 + 1
    gn = GroupNorm(8)
    variables = gn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    scale = np.linspace(0.5, 1.5, 16).astype(np.float32)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}}
    ours = gn.apply(variables, jnp.asarray(x))
    ref = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2), 8, torch.from_numpy(scale),
                                         torch.from_numpy(bias), eps=1e-5).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def _group_norm_float64(x, groups=8, eps=1e-5):
    g = np.asarray(x, np.float64).reshape(*x.shape[:3], groups, -1)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = np.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_pixel_sums_are_per_channel_sums_over_all_pixels():
    x = np.random.default_rng(2).standard_normal((2, 7, 9, 5)).astype(np.float32)   # 63 pixels: a partial block
    sums = pixel_sums(jnp.asarray(x), block=8)
    np.testing.assert_allclose(sums, x.astype(np.float64).sum(axis=(1, 2)), rtol=1e-6, atol=1e-5)


def test_group_norm_stays_close_to_float64_over_a_mask_head_map():
    """A mask-head map at 800x1066 (stride 16: 50x67, 128 channels) with a large mean, compiled
    as the mask head's program is: within 2e-6 of float64 (the reduction over (H, W, C / 8) that
    `pixel_sums` replaced was 4.7e-6 off here, 6.7e-6 at 24 queries)."""
    from detr_jax import xla_cpu

    x = np.random.default_rng(3).standard_normal((2, 50, 67, 128)).astype(np.float32) * 2 + 3
    variables = {"params": {"scale": np.ones(128, np.float32), "bias": np.zeros(128, np.float32)}}
    gn = xla_cpu.jit(lambda x, sizes: GroupNorm(8).apply(variables, x, sizes), xla_cpu.MASK_HEAD)
    ref = _group_norm_float64(x)
    assert np.abs(np.asarray(gn(jnp.asarray(x), None)) - ref).max() < 2e-6
    assert np.abs(np.asarray(gn(jnp.asarray(x), jnp.array([[50, 67], [50, 67]]))) - ref).max() < 2e-6


def test_masked_group_norm_on_padded_input_equals_unpadded():
    x = np.random.default_rng(1).standard_normal((2, 9, 11, 16)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 3), (0, 5), (0, 0)), constant_values=7.0)
    gn = GroupNorm(8)
    variables = gn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    a = gn.apply(variables, jnp.asarray(x))
    b = gn.apply(variables, jnp.asarray(padded), jnp.array([[9, 11], [9, 11]]))[:, :9, :11]
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_dc5_model", "tiny_convnet_model"])
def test_padding_invariant_mode_equals_each_image_alone(fixture, request):
    """Odd sizes on purpose: the stride arithmetic (ceil halving) and nearest upsampling must agree."""
    model = request.getfixturevalue(fixture)
    sizes = [(61, 77), (45, 96)]
    x, mask = random_images(sizes, (64, 96), seed=3)
    batch = model(x, mask)
    for b, (h, w) in enumerate(sizes):
        alone = model(x[b:b + 1, :h, :w], mask[b:b + 1, :h, :w])
        mh, mw = alone["pred_masks"].shape[2:]
        np.testing.assert_allclose(batch["pred_logits"][b], alone["pred_logits"][0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(batch["pred_boxes"][b], alone["pred_boxes"][0], atol=1e-5)
        np.testing.assert_allclose(batch["pred_masks"][b, :, :mh, :mw], alone["pred_masks"][0], atol=1e-4, rtol=1e-4)
        for i, (aux_b, aux_a) in enumerate(zip(batch["aux_outputs"], alone["aux_outputs"])):
            np.testing.assert_allclose(aux_b["pred_boxes"][b], aux_a["pred_boxes"][0], atol=1e-5, err_msg=f"aux {i}")


def test_original_semantics_let_padding_change_the_outputs(tiny_model):
    x, mask = random_images([(61, 77)], (64, 96), seed=4)
    padded = tiny_model(x, mask, padding_invariant=False)
    alone = tiny_model(x[:, :61, :77], mask[:, :61, :77], padding_invariant=False)
    assert np.abs(np.asarray(padded["pred_boxes"]) - np.asarray(alone["pred_boxes"])).max() > 1e-4


def test_dropout_only_in_training(tiny_model):
    x, mask = random_images([(64, 64)], (64, 64))
    apply = jax.jit(tiny_model.module.apply, static_argnames="train")
    variables = tiny_model.variables
    eval_a = apply(variables, x, mask)
    eval_b = apply(variables, x, mask)
    np.testing.assert_array_equal(eval_a["pred_logits"], eval_b["pred_logits"])
    train_a = apply(variables, x, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b = apply(variables, x, mask, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(train_a["pred_logits"]) - np.asarray(train_b["pred_logits"])).max() > 1e-6


def test_compiles_once_per_shape(tiny_model):
    x, mask = random_images([(32, 32)], (32, 32))
    before = tiny_model._detect._cache_size()
    tiny_model(x, mask)
    tiny_model(x + 1, mask)
    assert tiny_model._detect._cache_size() == before + 1
    x2, mask2 = random_images([(32, 64)], (32, 64))
    tiny_model(x2, mask2)
    assert tiny_model._detect._cache_size() == before + 2


@pytest.mark.parametrize("padding_invariant", [True, False])
def test_a_batch_runs_image_by_image_with_the_batch_outputs(tiny_model, padding_invariant):
    x, mask = random_images([(64, 80), (50, 70), (64, 96)], (64, 96), seed=5)
    # the batch at once, jitted: op by op, each of the model's operations compiled on its own took
    # longer than compiling the whole model
    batch = jax.jit(tiny_model.module.apply, static_argnames="padding_invariant")(
        tiny_model.variables, x, mask, padding_invariant=padding_invariant)
    one_by_one = tiny_model(x, mask, padding_invariant=padding_invariant)
    assert jax.tree_util.tree_structure(one_by_one) == jax.tree_util.tree_structure(batch)
    for got, want in zip(jax.tree_util.tree_leaves(one_by_one), jax.tree_util.tree_leaves(batch)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert tiny_model.policy.name == "cpu"
    assert "while" in tiny_model.lower(x, mask).as_text()   # one image at a time (lax.map), not the batch at once
    assert "scan" not in str(jax.make_jaxpr(lambda a, b: tiny_model.module.apply(tiny_model.variables, a, b))(x, mask))


def test_a_query_mask_is_the_same_whichever_queries_get_masks(tiny_model):
    """All queries, the K best or those over a threshold: the per-query mask head is one program,
    compiled per query count; the convolutions over another count of queries may sum in another
    order on some CPUs (seen: 1.1e-6 on values ~1), nothing more."""
    x, mask = random_images([(64, 80), (50, 70)], (64, 96), seed=3)
    every = np.asarray(tiny_model(x, mask)["pred_masks"])
    for out in (tiny_model(x, mask, mask_queries=5), tiny_model(x, mask, mask_threshold=0.0)):
        chosen = np.asarray(out["mask_query_indices"])[:, :, None, None]
        np.testing.assert_allclose(np.take_along_axis(np.asarray(out["pred_masks"]), chosen, 1),
                                   np.take_along_axis(every, chosen, 1), rtol=0, atol=1e-5)


def test_compiler_memory_is_released_after_each_compilation_only(tiny_model, monkeypatch):
    from detr_jax import runtime

    releases = []
    monkeypatch.setattr(runtime, "release_host_memory", lambda: releases.append(1))
    x, mask = random_images([(32, 96)], (32, 96))
    assert tiny_model.config.masks
    tiny_model(x, mask)                         # two programs: the model (per-image mask head), the per-query mask head
    tiny_model(x, mask)
    assert len(releases) == 2
    tiny_model(x, mask, mask_threshold=0.0)     # one new program: the per-query mask head on [B, K] chosen queries
    tiny_model(x, mask, mask_threshold=0.0)
    assert len(releases) == 3
    monkeypatch.undo()
    runtime.release_host_memory()               # the real one runs (glibc malloc_trim, or nothing)


def test_convnet_backbone_gives_stride_16_tokens_and_a_stride_4_mask_grid(tiny_convnet_model):
    x, mask = random_images([(64, 96)], (64, 96))
    # jitted: compiling the whole model takes less time than compiling each operation on its own
    apply = jax.jit(functools.partial(tiny_convnet_model.module.apply, mutable=["intermediates"]))
    out, state = apply(tiny_convnet_model.variables, x, mask)
    layers = [state["intermediates"][f"backbone_layer{i}"][0] for i in range(1, 5)]
    assert [f.shape[1:] for f in layers] == [(16, 24, 64), (8, 12, 128), (4, 6, 128), (4, 6, 128)]
    assert out["pred_masks"].shape[2:] == (16, 24)
    params = tiny_convnet_model.variables["params"]["backbone"]
    assert sorted(params) == [f"stage{s}_conv{k}" for s in range(1, 5) for k in (1, 2)]
    std = np.std(np.asarray(params["stage3_conv2"]["kernel"]))
    assert abs(std - np.sqrt(2 / (9 * 128))) < 0.1 * np.sqrt(2 / (9 * 128))    # He init for ReLU
    with pytest.raises(ValueError, match="dilated"):
        dataclasses.replace(TINY, backbone="convnet_small", dilation=True).is_convnet
    with pytest.raises(ValueError, match="convnet_small"):
        dataclasses.replace(TINY, backbone="vgg").is_convnet


@pytest.mark.parametrize("buffers", [{}, None])
def test_a_convnet_checkpoint_without_batchnorm_buffers_loads_back(tiny_convnet_model, tmp_path, buffers):
    """Training exports {'params', 'buffers': {}} for a model without frozen BatchNorm; a plain
    save of init_variables has no 'buffers' at all: both load."""
    from detr_jax.checkpoint import load_variables, save

    variables = dict(tiny_convnet_model.variables)
    assert "buffers" not in variables
    if buffers is not None:
        variables["buffers"] = buffers
    save(tmp_path / "model", tiny_convnet_model.config, variables)
    loaded = load_variables(tmp_path / "model", tiny_convnet_model.config)
    for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)


def test_pre_norm_and_detection_variants_build_and_run():
    for config in (dataclasses.replace(TINY, pre_norm=True), dataclasses.replace(TINY, masks=False, aux_loss=False)):
        variables = init_variables(config, jax.random.PRNGKey(0), (32, 32))
        out = jax.jit(DETR(config).apply)(variables, jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32), bool))
        assert ("pred_masks" in out) == config.masks and ("aux_outputs" in out) == config.aux_loss
        if config.pre_norm:
            assert "norm" in variables["params"]["transformer"]["encoder"]


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    variables = init_variables(config, jax.random.PRNGKey(0), (32, 32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out = jax.jit(DETR(config).apply)(variables, jnp.ones((1, 32, 32, 3)), jnp.ones((1, 32, 32), bool))
    assert out["pred_logits"].dtype == jnp.float32 and np.isfinite(np.asarray(out["pred_masks"])).all()
