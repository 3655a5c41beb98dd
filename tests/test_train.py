"""Training: the optimizer's partition and schedule, fine-tuning from a checkpoint, and real runs
of `train()` on a tiny synthetic panoptic dataset (overfitting, frozen parts, metrics, checkpoints,
the exported model, stage 2 of the panoptic recipe).

One training run is shared by the module (compiling the tiny model's train step on the CPU takes
most of the time); the kill/resume, pmap and multi-process checks live in test_train_multiprocess.py.
"""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from detr_jax import checkpoint, optim, runtime
from detr_jax.config import TrainConfig, load_config
from detr_jax.data.coco import CocoPanoptic
from detr_jax.data.synthetic import ensure_synthetic
from detr_jax.models.detr import DETR, abstract_variables, init_variables
from detr_jax import train as train_module
from detr_jax.train import nonfinite_error, run_keys, stage_configs, train
from detr_jax.train_state import IncompatibleCheckpointError, merge_pretrained

# The overfitting run: 100 steps (warm-up over 25, the lr drop after 75) pass every threshold of
# test_overfits_two_images by a factor of 5 or more (the measured values are there).  Its steps,
# not the compilation, were most of the time of the 400-step run it replaces (146 s).
OVERFIT_STEPS, OVERFIT_WARMUP, OVERFIT_LR_DROP = 100, 25, 75


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"   # jax.monitoring's event of one XLA compile


def flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def fixed_size_config(**train_overrides):
    """detr_tiny on 64x64 images without augmentation (one compiled shape), no dropout."""
    cfg = load_config("detr_tiny")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dropout=0.0),
        data=dataclasses.replace(cfg.data, train_scales=(64,), train_max_size=64, crop_prob=0.0, hflip_prob=0.0),
        train=TrainConfig(**{**dict(batch_size=2, lr=1e-3, lr_backbone=1e-4, log_every=10, save_every=50,
                                    keep_checkpoints=2, num_workers=0), **train_overrides}))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=0, image_size=(64, 64))
    return CocoPanoptic(root, "train2017")


def counting_compiles(make_parallel, compiles_per_call):
    """`make_parallel_train_step` whose parallel step appends to `compiles_per_call` the number of
    XLA compilations each call ran."""
    def counting(step_fn):
        parallel = make_parallel(step_fn)

        def call(*args):
            events = []
            listener = lambda name, secs, **kw: events.append(name) if name == BACKEND_COMPILE_EVENT else None  # noqa: E731
            jax.monitoring.register_event_duration_secs_listener(listener)
            try:
                return parallel(*args)
            finally:
                jax.monitoring.unregister_event_duration_listener(listener)
                compiles_per_call.append(len(events))
        return call
    return counting


@pytest.fixture(scope="module")
def overfit(dataset, tmp_path_factory):
    """Joint (boxes + masks) training of detr_tiny on 2 images, with the mask losses.  The run also
    records the XLA compilations of each call of its step and its calls of `runtime.keep_host_heap`
    (which still does its work): compiling the scipy matcher's step is most of a short run's time,
    so the compile-once check shares this run rather than compiling the same step for 3 steps."""
    # warm-up and an lr drop: without them the 2-image run is chaotic (grad norms 100-250 under
    # clipping at 0.1), and float-level changes (a 1x1 conv as a dot) flipped pass and fail
    config = fixed_size_config(max_steps=OVERFIT_STEPS, warmup_steps=OVERFIT_WARMUP, lr_drop_step=OVERFIT_LR_DROP)
    workdir = tmp_path_factory.mktemp("overfit")
    compiles_per_call, heap_calls = [], []
    with pytest.MonkeyPatch.context() as patch:
        keep_host_heap = runtime.keep_host_heap
        patch.setattr(runtime, "keep_host_heap", lambda: heap_calls.append(1) or keep_host_heap())
        patch.setattr(train_module, "make_parallel_train_step",
                      counting_compiles(train_module.make_parallel_train_step, compiles_per_call))
        result = train(config, workdir, dataset, progress=False)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    model_config, _ = stage_configs(config)
    initial = init_variables(model_config, run_keys(config.train.seed)[0])
    return {"config": config, "workdir": workdir, "result": result, "rows": rows, "initial": initial,
            "compiles_per_call": compiles_per_call, "heap_calls": heap_calls}


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------
def test_labels_freeze_stem_and_layer1_and_give_the_backbone_its_own_lr():
    config = TrainConfig()
    assert optim.param_label("backbone/conv1/kernel", config) == optim.FROZEN
    assert optim.param_label("backbone/layer1_0/conv2/kernel", config) == optim.FROZEN
    assert optim.param_label("backbone/layer2_0/conv1/kernel", config) == optim.BACKBONE
    assert optim.param_label("backbone/layer4_2/downsample_0/kernel", config) == optim.BACKBONE
    assert optim.param_label("transformer/encoder/layers_0/linear1/kernel", config) == optim.DEFAULT
    assert optim.param_label("class_embed/kernel", config) == optim.DEFAULT
    masks = dataclasses.replace(config, stage="masks")
    assert optim.param_label("mask_head/lay1/kernel", masks) == optim.DEFAULT
    assert optim.param_label("bbox_attention/q_linear/kernel", masks) == optim.DEFAULT
    assert optim.param_label("class_embed/kernel", masks) == optim.FROZEN
    assert optim.param_label("backbone/layer3_0/conv1/kernel", masks) == optim.FROZEN
    with pytest.raises(ValueError, match="stage"):
        optim.param_label("class_embed/kernel", dataclasses.replace(config, stage="boxes"))


def test_lr_schedule_drops_tenfold_at_the_drop_epoch_and_warms_up():
    config = TrainConfig(lr_drop_epochs=200)
    main, backbone = (optim.lr_schedule(lr, config, steps_per_epoch=5) for lr in (config.lr, config.lr_backbone))
    assert np.isclose(main(0), 1e-4) and np.isclose(main(999), 1e-4)      # epoch 199, last step
    assert np.isclose(main(1000), 1e-5) and np.isclose(main(10 ** 6), 1e-5)
    assert np.isclose(backbone(999), 1e-5) and np.isclose(backbone(1000), 1e-6)
    by_step = optim.lr_schedule(1e-4, TrainConfig(lr_drop_step=7), steps_per_epoch=5)
    assert np.isclose(by_step(6), 1e-4) and np.isclose(by_step(7), 1e-5)
    warm = optim.lr_schedule(1e-4, TrainConfig(warmup_steps=4), steps_per_epoch=5)
    assert np.allclose([warm(s) for s in range(5)], [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])


def test_cosine_lr_warms_up_then_falls_to_zero_at_the_last_step():
    cosine = optim.lr_schedule(1e-3, TrainConfig(lr_decay="cosine", warmup_steps=10, max_steps=110), 5)
    assert np.isclose(cosine(0), 0.0) and np.isclose(cosine(5), 5e-4) and np.isclose(cosine(10), 1e-3)
    assert np.isclose(cosine(60), 5e-4)                      # halfway through the decay
    assert np.isclose(cosine(110), 0.0, atol=1e-12) and cosine(59) > cosine(61)
    by_epochs = optim.lr_schedule(1e-3, TrainConfig(lr_decay="cosine", epochs=4), steps_per_epoch=5)
    assert np.isclose(by_epochs(10), 5e-4)                   # 20 steps in all
    with pytest.raises(ValueError, match="lr_decay"):
        optim.lr_schedule(1e-3, TrainConfig(lr_decay="linear"), 5)


def test_optimizer_is_adamw_with_clipping_and_no_update_for_frozen_parameters():
    params = {"backbone": {"conv1": {"kernel": np.ones(3, np.float32)},
                           "layer2_0": {"conv1": {"kernel": np.ones(3, np.float32)}}},
              "class_embed": {"kernel": np.ones(3, np.float32)}}
    grads = {"backbone": {"conv1": {"kernel": np.full(3, 100.0, np.float32)},   # frozen: not clipped
                          "layer2_0": {"conv1": {"kernel": np.array([3.0, 0, 0], np.float32)}}},
             "class_embed": {"kernel": np.array([0, 4.0, 0], np.float32)}}
    config = TrainConfig(clip_max_norm=0.1)
    tx = optim.make_optimizer(params, config, steps_per_epoch=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    updates = flat(updates)
    assert np.all(updates["backbone/conv1/kernel"] == 0)
    # first Adam step: lr * g / (|g| + eps) (clipping rescales g only) plus lr * wd * p
    np.testing.assert_allclose(updates["class_embed/kernel"], -1e-4 * (np.array([0, 1, 0]) + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(updates["backbone/layer2_0/conv1/kernel"], -1e-5 * (np.array([1, 0, 0]) + 1e-4),
                               rtol=1e-5)


def test_nonfinite_loss_names_the_first_bad_step():
    history = [{"step": 7, "loss": 1.0, "loss_ce": 1.0}, {"step": 8, "loss": np.nan, "loss_ce": np.inf},
               {"step": 9, "loss": np.nan, "loss_ce": 1.0}]
    error = nonfinite_error(history)
    assert isinstance(error, FloatingPointError) and "at step 8" in str(error) and "loss_ce" in str(error)
    assert nonfinite_error(history[:1]) is None


# ------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------
def test_init_from_another_number_of_classes_reinitializes_only_the_class_head(tmp_path, caplog):
    from detr_jax.train_state import load_pretrained

    cfg = load_config("detr_tiny").model
    source = init_variables(cfg, jax.random.PRNGKey(1))
    checkpoint.save(tmp_path / "src", cfg, source)
    target_cfg = dataclasses.replace(cfg, num_classes=3)
    fresh = jax.tree.map(np.asarray, init_variables(target_cfg, jax.random.PRNGKey(2)))
    with caplog.at_level("WARNING"):
        merged = load_pretrained(tmp_path / "src", fresh, target_cfg)
    assert "class_embed" in caplog.text and "3 in the model" in caplog.text
    merged, source, fresh = flat(merged), flat(source), flat(fresh)
    for key, value in merged.items():
        expected = fresh[key] if key.startswith("params/class_embed/") else source[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    assert merged["params/class_embed/kernel"].shape == (cfg.hidden_dim, 4)


def test_init_from_fails_loudly_on_arrays_that_do_not_fit():
    fresh = {"params": {"class_embed": {"kernel": np.zeros((4, 3))}, "input_proj": {"kernel": np.zeros((2, 2))},
                        "mask_head": {"lay1": {"kernel": np.zeros(2)}}}}
    merged, report = merge_pretrained(fresh, {"params": {"class_embed": {"kernel": np.ones((4, 5))},
                                                         "input_proj": {"kernel": np.ones((2, 2))}}})
    assert report["reinitialized"] == ["params/class_embed/kernel (4, 5) -> (4, 3)", "params/mask_head/lay1/kernel"]
    assert np.all(merged["params"]["input_proj"]["kernel"] == 1)
    with pytest.raises(IncompatibleCheckpointError) as error:
        merge_pretrained(fresh, {"params": {"class_embed": {"kernel": np.ones((4, 3))},
                                            "input_proj": {"kernel": np.ones((3, 2))}, "layer9": {"k": np.ones(1)}}})
    assert "mis-shaped (1): params/input_proj/kernel: checkpoint (3, 2), model (2, 2)" in str(error.value)
    assert "unexpected (1): params/layer9/k" in str(error.value)


# ------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_the_train_step_compiles_once_and_the_cpu_loop_keeps_its_host_heap(overfit):
    """The loop's first call must not leave the step with other argument shardings than its later
    calls: that compiled the whole step twice (14 s more per run for the demo config).  Neither do
    the logging steps nor the checkpoint saves compile it again.  Under the CPU policy the loop first
    makes the C heap keep the memory its steps free."""
    assert overfit["compiles_per_call"] == [1] + [0] * (OVERFIT_STEPS - 1)
    assert overfit["heap_calls"] == ([1] if runtime.resolve_policy().keep_host_heap else [])


def test_masks_of_the_matched_queries_only_give_the_same_step(monkeypatch):
    """With fewer target slots (8) than queries (12), the step runs the mask head's per-query part
    on the matched queries only; losses, gradients and the update equal those of every query's mask."""
    config = fixed_size_config()
    model_config, loss_config = stage_configs(config)
    assert train_module.matched_masks_only(model_config, loss_config, config.data.max_boxes)
    assert not train_module.matched_masks_only(model_config, loss_config, model_config.num_queries)
    rng = np.random.default_rng(0)
    count = np.array([3, 5])
    valid = np.arange(8)[None] < count[:, None]
    centers, sizes = rng.uniform(0.3, 0.7, (2, 8, 2)), rng.uniform(0.1, 0.4, (2, 8, 2))
    yy, xx = np.mgrid[:64, :64] / 64.0
    masks = (np.abs(yy - centers[..., 1, None, None]) < sizes[..., 1, None, None] / 2) & \
            (np.abs(xx - centers[..., 0, None, None]) < sizes[..., 0, None, None] / 2)
    batch = dict(pixel_values=rng.normal(size=(2, 64, 64, 3)).astype(np.float32), pixel_mask=np.ones((2, 64, 64), bool),
                 labels=np.where(valid, rng.integers(1, 10, (2, 8)), 0).astype(np.int32),
                 boxes=np.concatenate([centers, sizes], -1).astype(np.float32), valid=valid, masks=masks & valid[..., None, None],
                 sample_valid=np.ones(2, bool))
    init_rng, step_rng = run_keys(0)
    optimizer = optim.make_optimizer(init_variables(model_config, init_rng)["params"], config.train, 1)
    state = train_module.initial_state(config, model_config, optimizer, None, init_rng)

    def one_step():
        step = train_module.make_train_step(
            DETR(model_config), loss_config, optimizer, optim.lr_schedule(config.train.lr, config.train, 1),
            optim.trainable_mask(state.params, config.train), axis_name=None)
        return jax.device_get(jax.jit(step)(state, batch, step_rng))

    matched_state, matched_metrics = one_step()
    monkeypatch.setattr(train_module, "matched_masks_only", lambda *args: False)
    full_state, full_metrics = one_step()
    assert matched_metrics["loss_mask"] > 0 and matched_metrics["loss_dice"] > 0
    for name in full_metrics:
        np.testing.assert_allclose(matched_metrics[name], full_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
    mask_head = {k: v for k, v in flat(full_state.params).items() if k.startswith(("mask_head/", "bbox_attention/"))}
    for path, value in flat(matched_state.params).items():
        np.testing.assert_allclose(value, flat(full_state.params)[path], rtol=1e-4, atol=1e-6, err_msg=path)
    assert any(not np.allclose(v, flat(state.params)[k]) for k, v in mask_head.items())   # the step did train them


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_overfits_two_images(overfit):
    first, last = overfit["rows"][0], overfit["rows"][-1]
    assert last["step"] == OVERFIT_STEPS
    # measured with seeds 42, 7, 3 (steps 1-10 -> 91-100): loss 0.083x, 0.066x, 0.077x; L1 0.023x,
    # 0.023x, 0.021x; GIoU 0.041x, 0.036x, 0.040x; class error -> 0% (2026-12-06)
    assert last["loss"] < 0.45 * first["loss"], (first, last)
    assert last["loss_bbox"] < 0.3 * first["loss_bbox"] and last["loss_giou"] < 0.3 * first["loss_giou"], (first, last)
    assert last["class_error"] < 15, (first, last)


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_every_loss_term_and_the_run_metrics_are_logged(overfit):
    row = overfit["rows"][-1]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_error",
                "cardinality_error", "loss_ce_0", "loss_bbox_0", "loss_giou_0", "lr", "grad_norm", "images_per_s"):
        assert key in row and np.isfinite(row[key]), key
    # warm-up over 25 steps, then 1e-3 until the drop at step 75 (the row of step s shows step s-1's lr)
    expected = lambda step: 1e-3 * min(1.0, step / OVERFIT_WARMUP) * (1.0 if step <= OVERFIT_LR_DROP else 0.1)  # noqa: E731
    assert all(np.isclose(r["lr"], expected(r["step"])) for r in overfit["rows"])
    assert [r["step"] for r in overfit["rows"]] == list(range(10, OVERFIT_STEPS + 1, 10))


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_frozen_parts_never_change_and_the_rest_trains(overfit):
    initial, final = flat(overfit["initial"]), flat({"params": overfit["result"]["state"].params,
                                                    "buffers": overfit["result"]["state"].buffers})
    assert set(initial) == set(final)
    frozen = [k for k in initial if k.startswith(("buffers/", "params/backbone/conv1/", "params/backbone/layer1_"))]
    assert any(k.startswith("params/backbone/layer1_") for k in frozen)
    for key in frozen:
        np.testing.assert_array_equal(final[key], initial[key], err_msg=key)
    for key in ("params/backbone/layer2_0/conv1/kernel", "params/class_embed/kernel", "params/mask_head/lay1/kernel"):
        assert not np.array_equal(final[key], initial[key]), key


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_checkpoints_keep_the_last_n_and_the_export_loads(overfit):
    workdir, state = overfit["workdir"], overfit["result"]["state"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [OVERFIT_STEPS - 50, OVERFIT_STEPS]
    assert int(state.step) == OVERFIT_STEPS
    assert checkpoint.read_config(workdir / "model") == dataclasses.replace(overfit["config"].model, dropout=0.0)
    model = runtime.load(workdir / "model")
    exported = flat(model.variables)
    for key, value in flat({"params": state.params, "buffers": state.buffers}).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_mask_stage_from_a_checkpoint_trains_only_the_mask_head(overfit, dataset, tmp_path):
    source = flat(runtime.load(overfit["workdir"] / "model").variables)
    config = fixed_size_config(max_steps=2, stage="masks", log_every=1)
    result = train(config, tmp_path, dataset, init_from=overfit["workdir"] / "model", progress=False)
    final = flat({"params": result["state"].params, "buffers": result["state"].buffers})
    trainable = ("params/bbox_attention/", "params/mask_head/")
    for key, value in final.items():
        if key.startswith(trainable):
            continue
        np.testing.assert_array_equal(value, source[key], err_msg=key)
    assert all(not np.array_equal(final[k], source[k]) for k in final if k.startswith(trainable) and "kernel" in k)
    assert {"loss_mask", "loss_dice"} <= set(result["metrics"])


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_resume_false_refuses_a_workdir_with_checkpoints(overfit, dataset):
    with pytest.raises(FileExistsError, match="holds checkpoints"):
        train(overfit["config"], overfit["workdir"], dataset, resume=False)


@pytest.mark.slow  # shares one 100-step run; compiling the step takes 1-6 min on a busy CPU
def test_resuming_a_finished_run_trains_nothing_and_exports_the_same_model(overfit, dataset):
    import detr_jax

    exported = detr_jax.load(overfit["workdir"] / "model").variables
    result = train(overfit["config"], overfit["workdir"], dataset, resume=True, progress=False)
    assert result["steps"] == 0 and int(result["state"].step) == OVERFIT_STEPS
    again = detr_jax.load(overfit["workdir"] / "model").variables
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(again)))


def test_cli_train_parses_into_the_library_call(monkeypatch):
    from detr_jax import cli, train as train_module

    calls = []
    monkeypatch.setattr(train_module, "run", lambda *args, **kwargs: calls.append((args, kwargs)) or {"steps": 0})
    assert cli.main(["train", "--config", "detr_tiny", "--images", "imgs", "--annotations", "a.json",
                     "--panoptic-dir", "png", "--workdir", "wd", "--no-resume", "--max-steps", "5",
                     "--batch-size", "4", "--stage", "masks", "--init-from", "ckpt", "--num-classes", "auto",
                     "--query-groups", "3", "--denoising-groups", "5", "--encoder-supervision", "0.5"]) == 0
    (args, kwargs), = calls
    assert args == ("detr_tiny", "wd")
    assert kwargs == dict(num_classes="auto", batch_size=4, max_steps=5, stage="masks", init_from="ckpt",
                          mixed_precision=None, query_groups=3, denoising_groups=5, encoder_supervision=0.5,
                          resume=False, coordinator_address=None, num_processes=None, process_id=None, data=None,
                          split="train2017", images="imgs", annotations="a.json", panoptic_dir="png", progress=True)
    assert cli.main(["train", "--config", "detr_tiny", "--data", "coco", "--workdir", "wd", "--no-progress"]) == 0
    assert calls[-1][1]["progress"] is False


# ------------------------------------------------------------------------------------------------
# The mask head's attention-map kernel at step 0
# ------------------------------------------------------------------------------------------------
def test_a_fresh_mask_head_starts_with_its_attention_map_kernel_scaled_and_a_loaded_one_as_it_is(tmp_path):
    cfg = load_config("detr_tiny")
    heads, model_config = cfg.model.num_heads, cfg.model
    optimizer = optim.make_optimizer(abstract_variables(model_config)["params"], cfg.train, 10)

    def initial(gain, init_from=None):
        config = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mask_attention_gain=gain))
        return train_module.initial_state(config, model_config, optimizer, init_from, jax.random.PRNGKey(3))

    plain_state = initial(1.0)
    plain, scaled = flat(plain_state.params), flat(initial(4.0).params)
    kernel = "mask_head/lay1/kernel"
    np.testing.assert_array_equal(scaled[kernel][:, :, -heads:], 4.0 * plain[kernel][:, :, -heads:])
    np.testing.assert_array_equal(scaled[kernel][:, :, :-heads], plain[kernel][:, :, :-heads])
    assert all(np.array_equal(scaled[k], v) for k, v in plain.items() if k != kernel)
    # the demo's gain is 16 x (heads x h x w of its 128-pixel images at stride 16), as measured
    demo = load_config("demo")
    assert train_module.mask_attention_positions(demo.model, 128) == 8 * 8 * 8
    assert demo.train.mask_attention_gain == 16 * train_module.mask_attention_positions(demo.model, 128)

    checkpoint.save(tmp_path / "panoptic", model_config, {"params": plain_state.params, "buffers": plain_state.buffers})
    loaded = flat(initial(4.0, init_from=tmp_path / "panoptic").params)
    np.testing.assert_array_equal(loaded[kernel], plain[kernel])        # a trained mask head is kept
