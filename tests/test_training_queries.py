"""Training-only accelerators (query denoising, parallel query groups): the noise, the decoder
self-attention mask, that nothing leaks between query groups, the losses of each group, and that
training with them exports plain DETR.

A tiny detection model (64 x 64 images, 12 queries, 2 decoder layers) is built once per module.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import detr_jax
from detr_jax import checkpoint, encoder_supervision, training_queries
from detr_jax.config import DenoisingConfig, LossConfig, TrainConfig, known_configs, load_config
from detr_jax.losses import set_criterion
from detr_jax.matcher import hungarian_match
from detr_jax.models.detr import DETR, MLP, init_variables
from detr_jax.training_queries import (TRAINING_ONLY, TrainingQueries, noised_targets, self_attention_mask,
                                       split_outputs, training_criterion)

GROUPS, DN_GROUPS, SLOTS = 3, 2, 4


def criterion(queries, loss_config):
    """`training_criterion` of `queries` and `loss_config`, jitted (op by op it takes a minute)."""
    return jax.jit(lambda outputs, targets, assignment: training_criterion(outputs, targets, assignment, queries,
                                                                           loss_config))


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("detr_tiny").model
    model_config = dataclasses.replace(cfg, masks=False, dropout=0.0)
    variables = init_variables(model_config, jax.random.PRNGKey(0))
    queries = TrainingQueries(model_config, GROUPS, DenoisingConfig(groups=DN_GROUPS, box_noise=0.4, label_noise=0.2))
    extra_params = queries.init_params(jax.random.PRNGKey(1))
    images, pixel_mask = tiny_images()
    targets = random_targets(np.random.default_rng(0), counts=(3, 1))

    run = jax.jit(lambda variables, extra: DETR(model_config).apply(
        variables, images, pixel_mask, extra, method=DETR.detect_with_extra_queries)[0])
    make_queries = jax.jit(lambda extra_params, noise_rng: queries.apply({"params": extra_params}, targets, noise_rng))

    def decode(variables, extra_params, noise_rng):
        extra, assignment = make_queries(extra_params, noise_rng)
        return run(variables, extra), assignment, extra

    plain = jax.jit(lambda v: DETR(model_config).apply(v, images, pixel_mask, method=DETR.detect)[0])(variables)
    return dict(config=model_config, variables=variables, queries=queries, extra_params=extra_params,
                targets=targets, decode=decode, run=run, plain=plain)


def tiny_images():
    """Two random 64 x 64 images, the second padded on the right."""
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    pixel_mask = np.ones((2, 64, 64), bool)
    pixel_mask[1, :, 48:] = False
    return images, pixel_mask


def random_targets(rng, counts, slots=SLOTS, num_classes=10):
    valid = np.arange(slots)[None] < np.asarray(counts)[:, None]
    centers, sizes = rng.uniform(0.3, 0.7, (len(counts), slots, 2)), rng.uniform(0.1, 0.4, (len(counts), slots, 2))
    return dict(labels=np.where(valid, rng.integers(0, num_classes, valid.shape), 0).astype(np.int32),
                boxes=np.concatenate([centers, sizes], -1).astype(np.float32), valid=valid)


def flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


# ------------------------------------------------------------------------------------------------
# Noise and the attention mask
# ------------------------------------------------------------------------------------------------
def test_zero_noise_gives_the_targets_themselves():
    targets = random_targets(np.random.default_rng(1), counts=(4, 2))
    labels, boxes = noised_targets(targets["labels"], targets["boxes"], 3, DenoisingConfig(3, 0.0, 0.0), 10,
                                   jax.random.PRNGKey(0))
    assert labels.shape == (2, 3, SLOTS) and boxes.shape == (2, 3, SLOTS, 4)
    np.testing.assert_array_equal(labels, np.broadcast_to(targets["labels"][:, None], labels.shape))
    np.testing.assert_array_equal(boxes, np.broadcast_to(targets["boxes"][:, None], boxes.shape))


def test_box_noise_moves_centers_by_at_most_half_a_side_times_the_scale_and_labels_flip_at_the_rate():
    rng = np.random.default_rng(2)
    targets = random_targets(rng, counts=(SLOTS,) * 2)
    config = DenoisingConfig(groups=500, box_noise=0.4, label_noise=0.2)
    labels, boxes = map(np.asarray, noised_targets(targets["labels"], targets["boxes"], 500, config, 10,
                                                   jax.random.PRNGKey(3)))
    gt = targets["boxes"][:, None]
    assert np.all(np.abs(boxes[..., :2] - gt[..., :2]) <= 0.4 * gt[..., 2:] / 2 + 1e-6)
    ratio = boxes[..., 2:] / gt[..., 2:]
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6 and ratio.std() > 0.1
    kept = np.mean(labels == targets["labels"][:, None])        # flipped 20%, 1 in 10 to the same class
    assert abs(kept - (0.8 + 0.2 / 10)) < 0.02


def test_self_attention_mask_keeps_groups_apart_and_hides_padded_denoising_slots():
    valid = np.array([[[True, False]] * 2])                       # 1 image, 2 denoising groups of 2 slots
    mask = np.asarray(self_attention_mask(num_queries=3, query_groups=2, denoising_valid=valid))[0]
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])              # query groups 0, 1; denoising groups 2, 3
    for i in range(10):
        for j in range(10):
            expected = (group[i] == group[j] and (group[j] < 2 or j in (6, 8))) or \
                (group[i] >= 2 and group[j] == 0) or i == j
            assert mask[i, j] == expected, (i, j)


# ------------------------------------------------------------------------------------------------
# Nothing leaks
# ------------------------------------------------------------------------------------------------
def test_the_model_queries_decode_as_in_the_plain_model(tiny):
    outputs, _, _ = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    q = tiny["config"].num_queries
    own, _, _ = split_outputs(outputs, q, GROUPS)
    assert outputs["pred_boxes"].shape == (2, GROUPS * q + DN_GROUPS * SLOTS, 4)
    for name in ("pred_logits", "pred_boxes"):
        np.testing.assert_allclose(own[name], tiny["plain"][name], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(own["aux_outputs"][0][name], tiny["plain"]["aux_outputs"][0][name],
                                   atol=2e-5, rtol=1e-5)


def test_query_groups_see_no_denoising_query_and_denoising_groups_not_each_other(tiny):
    q = tiny["config"].num_queries
    before, _, _ = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    other_noise, _, _ = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(1))
    changed = dict(tiny["extra_params"])                        # other label embeddings for every denoising query
    changed["label_embed"] = {"embedding": tiny["extra_params"]["label_embed"]["embedding"] + 1.0}
    other_content, _, _ = tiny["decode"](tiny["variables"], changed, jax.random.PRNGKey(0))
    for after in (other_noise, other_content):
        np.testing.assert_array_equal(after["pred_boxes"][:, :GROUPS * q], before["pred_boxes"][:, :GROUPS * q])
        np.testing.assert_array_equal(after["pred_logits"][:, :GROUPS * q], before["pred_logits"][:, :GROUPS * q])
        assert not np.allclose(after["pred_boxes"][:, GROUPS * q:], before["pred_boxes"][:, GROUPS * q:])

    # the first denoising group's content changed: the second group is unchanged
    _, _, extra = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    first_group = slice(GROUPS * q, GROUPS * q + SLOTS)
    content = np.asarray(extra.content).copy()
    content[:, first_group.start - q:first_group.stop - q] += 1.0      # content excludes the model's own q
    moved = tiny["run"](tiny["variables"], dataclasses.replace(extra, content=jnp.asarray(content)))
    np.testing.assert_array_equal(moved["pred_boxes"][:, first_group.stop:], before["pred_boxes"][:, first_group.stop:])
    assert not np.allclose(moved["pred_boxes"][:, first_group], before["pred_boxes"][:, first_group])


def test_one_query_group_is_blind_to_the_others(tiny):
    q = tiny["config"].num_queries
    before, _, _ = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    changed = dict(tiny["extra_params"])
    embed = np.asarray(changed["group_query_embed"]).copy()
    embed[q:] = np.random.default_rng(5).normal(size=embed[q:].shape)     # the third group's positions
    changed["group_query_embed"] = jnp.asarray(embed)
    after, _, _ = tiny["decode"](tiny["variables"], changed, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(after["pred_boxes"][:, :2 * q], before["pred_boxes"][:, :2 * q])
    assert not np.allclose(after["pred_boxes"][:, 2 * q:3 * q], before["pred_boxes"][:, 2 * q:3 * q])


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def perfect_denoising_outputs(outputs, targets, assignment, q):
    """`outputs` with every denoising query predicting exactly the target it was built from."""
    slot = np.maximum(np.asarray(assignment), 0)
    boxes = np.take_along_axis(targets["boxes"], slot[..., None], axis=1)
    labels = np.take_along_axis(targets["labels"], slot, axis=1)
    logits = 50.0 * jax.nn.one_hot(labels, outputs["pred_logits"].shape[-1])
    out = dict(outputs, aux_outputs=[])
    out["pred_boxes"] = outputs["pred_boxes"].at[:, GROUPS * q:].set(boxes)
    out["pred_logits"] = outputs["pred_logits"].at[:, GROUPS * q:].set(logits)
    return out


def test_denoising_losses_are_against_the_targets_the_queries_were_built_from(tiny):
    q = tiny["config"].num_queries
    outputs, assignment, extra = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    loss_config = LossConfig(aux_loss=False)
    targets = tiny["targets"]
    np.testing.assert_array_equal(assignment, np.tile(np.where(targets["valid"], np.arange(SLOTS), -1), DN_GROUPS))
    perfect = perfect_denoising_outputs(outputs, targets, assignment, q)
    losses = criterion(tiny["queries"], loss_config)
    terms = losses(perfect, targets, assignment)
    assert terms["loss_bbox_dn"] == 0 and abs(terms["loss_giou_dn"]) < 1e-6 and terms["loss_ce_dn"] < 1e-6

    # padded slots carry no loss, whatever their predictions
    junk = dict(perfect, pred_boxes=perfect["pred_boxes"].at[:, GROUPS * q:].set(
        jnp.where(np.asarray(assignment)[..., None] < 0, 0.9, perfect["pred_boxes"][:, GROUPS * q:])))
    assert losses(junk, targets, assignment)["loss_bbox_dn"] == 0

    # one box off by 0.1 in cx: L1 = 0.1 over the 2 groups x 4 real targets
    off = dict(perfect, pred_boxes=perfect["pred_boxes"].at[0, GROUPS * q, 0].add(0.1))
    terms = losses(off, targets, assignment)
    np.testing.assert_allclose(terms["loss_bbox_dn"], 0.1 / (DN_GROUPS * 4), rtol=1e-4)


def test_with_zero_noise_the_denoising_queries_are_built_from_the_targets_own_boxes(tiny):
    """The targets of the denoising losses are the targets themselves; with zero noise the queries'
    inputs are those targets too: their positions are the box embedding of the ground-truth boxes
    and their contents the embedding of the ground-truth labels."""
    exact = dataclasses.replace(tiny["queries"], denoising=DenoisingConfig(DN_GROUPS, 0.0, 0.0))
    extra, assignment = jax.jit(lambda params: exact.apply({"params": params}, tiny["targets"], jax.random.PRNGKey(7)))(
        tiny["extra_params"])
    q, c = tiny["config"].num_queries, tiny["config"].hidden_dim
    params = tiny["extra_params"]
    embed = training_queries.box_sine_embedding(jnp.asarray(tiny["targets"]["boxes"]), c // 2)
    expected_pos = MLP(c, c, 2).apply({"params": params["box_embed"]}, embed)
    expected_content = params["label_embed"]["embedding"][tiny["targets"]["labels"]]
    slots = np.where(tiny["targets"]["valid"], np.arange(SLOTS), -1)         # query g * M + m -> target m
    np.testing.assert_array_equal(assignment, np.tile(slots, DN_GROUPS))
    for g in range(DN_GROUPS):
        rows = slice((GROUPS - 1) * q + g * SLOTS, (GROUPS - 1) * q + (g + 1) * SLOTS)
        np.testing.assert_allclose(extra.pos[:, rows], expected_pos, atol=1e-6)
        np.testing.assert_array_equal(extra.content[:, rows], expected_content)


def test_each_query_group_gets_its_own_one_to_one_matching(tiny):
    q = tiny["config"].num_queries
    outputs, assignment, _ = tiny["decode"](tiny["variables"], tiny["extra_params"], jax.random.PRNGKey(0))
    loss_config = LossConfig()
    terms = criterion(tiny["queries"], loss_config)(outputs, tiny["targets"], assignment)
    own, groups, _ = split_outputs(outputs, q, GROUPS)
    plain_criterion = jax.jit(lambda outputs: set_criterion(outputs, tiny["targets"], loss_config))
    per_group = []
    for g in range(1, GROUPS):
        layer = lambda o: {k: o[k][:, g * q:(g + 1) * q] for k in ("pred_logits", "pred_boxes")}  # noqa: E731
        per_group.append(plain_criterion(dict(layer(outputs), aux_outputs=[layer(a) for a in outputs["aux_outputs"]])))
    np.testing.assert_allclose(terms["loss_groups"], np.mean([t["loss"] for t in per_group]), rtol=1e-5)
    plain = plain_criterion(own)
    np.testing.assert_allclose(terms["loss_ce"], plain["loss_ce"], rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], plain["loss"] + sum(t["loss"] for t in per_group) + terms["loss_dn"],
                               rtol=1e-5)
    # the matcher on the stacked groups gives each image of each group min(Q, #targets) distinct queries
    tiled = {k: np.concatenate([v] * (GROUPS - 1)) for k, v in tiny["targets"].items()}
    match = np.asarray(hungarian_match(groups, tiled))
    for row, count in zip(match, np.asarray(tiled["valid"]).sum(-1)):
        assert sorted(row[row >= 0]) == list(range(count))


# ------------------------------------------------------------------------------------------------
# Configs and training
# ------------------------------------------------------------------------------------------------
def test_the_accelerators_are_off_by_default_and_in_every_paper_recipe_and_the_demo_uses_the_encoder_loss_and_denoising():
    from detr_jax.demo import demo_stages

    model = load_config("detr_tiny").model
    assert training_queries.build(TrainConfig(), model) is None and encoder_supervision.build(TrainConfig(), model) is None
    for name in set(known_configs()) - {"demo"}:
        train = load_config(name).train
        assert train.query_groups == 1 and train.denoising.groups == 0 and train.encoder_supervision == 0, name
    stages = {name: config.train for name, config in demo_stages()}   # the demo: what its measurements chose
    assert (stages["detection"].query_groups, stages["detection"].denoising.groups) == (1, 1)
    assert stages["detection"].encoder_supervision == 2.0
    assert (stages["masks"].query_groups, stages["masks"].denoising.groups, stages["masks"].encoder_supervision) == (1, 0, 0)
    assert training_queries.build(TrainConfig(query_groups=2, stage="masks"), model) is None
    with pytest.raises(ValueError, match="query_groups"):
        training_queries.build(TrainConfig(query_groups=0), model)


@pytest.fixture(scope="module")
def accelerated_run(tmp_path_factory):
    """Two train steps of a tiny detection model with both accelerators on."""
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.synthetic import ensure_synthetic
    from detr_jax.train import train

    root = ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=0, image_size=(64, 64))
    cfg = load_config("detr_tiny")
    config = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dropout=0.0),
        data=dataclasses.replace(cfg.data, train_scales=(64,), train_max_size=64, crop_prob=0.0, hflip_prob=0.0),
        train=TrainConfig(batch_size=2, max_steps=2, log_every=1, save_every=2, num_workers=0, stage="detection",
                          query_groups=2, denoising=DenoisingConfig(groups=2), encoder_supervision=1.0))
    workdir = tmp_path_factory.mktemp("accelerated")
    result = train(config, workdir, CocoPanoptic(root, "train2017"), progress=False)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return dict(result=result, workdir=workdir, rows=rows)


def test_a_train_step_with_every_accelerator_runs_with_finite_losses(accelerated_run):
    rows = accelerated_run["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in ("loss", "loss_ce", "loss_groups", "loss_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn",
                     "loss_enc", "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
            assert np.isfinite(row[name]) and row[name] > 0, name
    params = flat(accelerated_run["result"]["state"].params)
    assert any(k.startswith(f"{TRAINING_ONLY}/group_query_embed") for k in params)
    assert any(k.startswith(f"{TRAINING_ONLY}/box_embed/") for k in params)
    assert any(k.startswith(f"{TRAINING_ONLY}/encoder_head/bbox_embed/") for k in params)


def test_training_with_accelerators_exports_plain_detr(accelerated_run):
    workdir, state = accelerated_run["workdir"], accelerated_run["result"]["state"]
    config = checkpoint.read_config(workdir / "model")
    exported = flat(checkpoint.load_variables(workdir / "model", config))
    trained = flat({"params": training_queries.model_params(state.params), "buffers": state.buffers})
    assert not any(TRAINING_ONLY in k for k in exported)
    assert set(exported) == {k for k, v in trained.items() if v.size} and set(exported) == set(
        flat(detr_jax.models.abstract_variables(config)))
    for key, value in exported.items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)

    model = detr_jax.load(workdir / "model", policy="cpu")
    forward = jax.jit(lambda variables: DETR(config).apply(variables, *tiny_images()))
    expected = forward({"params": training_queries.model_params(state.params), "buffers": state.buffers})
    loaded = forward(model.variables)
    for name in ("pred_logits", "pred_boxes"):
        np.testing.assert_array_equal(loaded[name], expected[name])


FINE_TUNE_CONFIG = '''
import dataclasses
from detr_jax.config import TrainConfig, load_config


def get_config():
    cfg = load_config("detr_tiny")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dropout=0.0),
        data=dataclasses.replace(cfg.data, train_scales=(64,), train_max_size=64, crop_prob=0.0, hflip_prob=0.0),
        train=TrainConfig(batch_size=2, max_steps=2, log_every=1, save_every=2, num_workers=0, stage="detection"))
'''


def test_fine_tuning_on_a_users_coco_set_with_the_accelerators_on(accelerated_run, tmp_path):
    """`detr-jax train --init-from MODEL --num-classes auto --query-groups 2 --denoising-groups 2
    --encoder-supervision 1` on a user's COCO-format detection set (the awkward set: every image
    kind, a truncated and a missing file): the class head is re-fitted to the set's labels,
    everything else starts from MODEL, and the result is plain DETR with the set's classes."""
    from awkward_set import write_awkward_set
    from detr_jax import train as train_module

    user_set = write_awkward_set(tmp_path / "set")
    config_file = tmp_path / "fine_tune.py"
    config_file.write_text(FINE_TUNE_CONFIG)
    source = accelerated_run["workdir"] / "model"
    result = train_module.run(str(config_file), tmp_path / "run", images=str(user_set["images"]),
                              annotations=str(user_set["instances"]), init_from=str(source), num_classes="auto",
                              query_groups=2, denoising_groups=2, encoder_supervision=1.0, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 2 and all(np.isfinite(r["loss_groups"]) and np.isfinite(r["loss_dn"])
                                        and np.isfinite(r["loss_enc"]) for r in rows)
    config = checkpoint.read_config(tmp_path / "run" / "model")
    assert config.num_classes == 2                                    # category ids {1}: classes 0..1
    exported = flat(checkpoint.load_variables(tmp_path / "run" / "model", config))
    assert not any(TRAINING_ONLY in k for k in exported)
    assert exported["params/class_embed/kernel"].shape == (config.hidden_dim, config.num_classes + 1)
    before = flat(checkpoint.load_variables(source, checkpoint.read_config(source)))
    # started from MODEL: its query embedding moved by two small steps, not re-drawn
    assert np.abs(exported["params/query_embed/embedding"] - before["params/query_embed/embedding"]).max() < 0.05
    model = detr_jax.load(tmp_path / "run" / "model", policy="cpu")
    images, masks = tiny_images()
    outputs = model(images, masks)
    assert outputs["pred_logits"].shape == (images.shape[0], config.num_queries, 3)
