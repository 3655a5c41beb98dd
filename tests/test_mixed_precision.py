"""bf16 mixed-precision training (`TrainConfig.mixed_precision`): compute in bfloat16, parameters,
optimizer state, losses and the matcher's inputs in float32.

A bf16 train step computes nearly the float32 step's loss on the same parameters and batch, and
a short bf16 run of the demo's detector still learns.
"""
import dataclasses
import json

import jax
import numpy as np
import pytest

from detr_jax import optim
from detr_jax import train as train_module
from detr_jax.config import TrainConfig, load_config
from detr_jax.data.coco import CocoPanoptic
from detr_jax.data.synthetic import ensure_synthetic
from detr_jax.models.detr import DETR, abstract_variables
from detr_jax.train import run_keys, stage_configs

SIDE = 64


def tiny_config(mixed_precision: bool):
    """detr_tiny without dropout, on SIDE x SIDE images, bf16 compute when `mixed_precision`."""
    cfg = load_config("detr_tiny")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0),
                               train=TrainConfig(batch_size=2, lr=1e-4, mixed_precision=mixed_precision))


def panoptic_batch(seed: int = 0, slots: int = 8):
    """Two SIDE x SIDE images with 3 and 5 boxes and their rectangle masks, in `slots` target slots."""
    rng = np.random.default_rng(seed)
    valid = np.arange(slots)[None] < np.array([[3], [5]])
    centers, sizes = rng.uniform(0.3, 0.7, (2, slots, 2)), rng.uniform(0.1, 0.4, (2, slots, 2))
    yy, xx = np.mgrid[:SIDE, :SIDE] / SIDE
    masks = (np.abs(yy - centers[..., 1, None, None]) < sizes[..., 1, None, None] / 2) & \
            (np.abs(xx - centers[..., 0, None, None]) < sizes[..., 0, None, None] / 2)
    return dict(pixel_values=rng.normal(size=(2, SIDE, SIDE, 3)).astype(np.float32),
                pixel_mask=np.ones((2, SIDE, SIDE), bool),
                labels=np.where(valid, rng.integers(1, 10, (2, slots)), 0).astype(np.int32),
                boxes=np.concatenate([centers, sizes], -1).astype(np.float32), valid=valid,
                masks=masks & valid[..., None, None], sample_valid=np.ones(2, bool))


def one_step(config, state, batch, step_rng):
    model_config, loss_config = stage_configs(config)
    optimizer = optim.make_optimizer(state.params, config.train, 1)
    step = train_module.make_train_step(DETR(model_config), loss_config, optimizer,
                                        optim.lr_schedule(config.train.lr, config.train, 1),
                                        optim.trainable_mask(state.params, config.train), axis_name=None)
    return model_config, jax.device_get(jax.jit(step)(state, batch, step_rng))


def test_a_bf16_train_step_gives_nearly_the_float32_loss_and_keeps_float32_state():
    f32_config, bf16_config = tiny_config(False), tiny_config(True)
    init_rng, step_rng = run_keys(0)
    model_config, loss_config = stage_configs(f32_config)
    optimizer = optim.make_optimizer(abstract_variables(model_config)["params"], f32_config.train, 1)
    state = train_module.initial_state(f32_config, model_config, optimizer, None, init_rng)   # the same for both
    batch = panoptic_batch()

    f32_model, (f32_state, f32_metrics) = one_step(f32_config, state, batch, step_rng)
    bf16_model, (bf16_state, bf16_metrics) = one_step(bf16_config, state, batch, step_rng)

    assert f32_model.dtype == "float32" and bf16_model.dtype == "bfloat16"
    assert np.isfinite(bf16_metrics["loss"]) and bf16_metrics["loss_mask"] > 0 and bf16_metrics["loss_dice"] > 0
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 0.2 % per operation); the loss sums
    # terms whose inputs pass through every layer: within 3 % of float32, and not bit-equal
    np.testing.assert_allclose(bf16_metrics["loss"], f32_metrics["loss"], rtol=3e-2)
    for term in ("loss_ce", "loss_bbox", "loss_giou", "loss_dice"):
        np.testing.assert_allclose(bf16_metrics[term], f32_metrics[term], rtol=5e-2, err_msg=term)
    assert bf16_metrics["loss"] != f32_metrics["loss"]             # bf16 did run
    for new in (bf16_state.params, bf16_state.opt_state):          # parameters and optimizer state stay float32
        dtypes = {np.asarray(leaf).dtype for leaf in jax.tree.leaves(new) if np.issubdtype(np.asarray(leaf).dtype, np.floating)}
        assert dtypes == {np.dtype(np.float32)}, dtypes


@pytest.mark.slow  # compiles the demo's train step: about 10 min on 2 cores at load 15, far less when quiet
def test_a_short_bf16_run_of_the_demo_detector_still_learns(tmp_path):
    """The demo's stage 1 (configs/demo.py: the detector, from scratch) with mixed precision, on 8
    synthetic images for 40 steps of batch 4 (the demo's own batch is 16 and 1500 steps; a smaller
    batch keeps this test near half a minute on 2 busy cores): the loss falls clearly."""
    demo = load_config("demo")
    config = dataclasses.replace(demo, train=dataclasses.replace(
        demo.train, mixed_precision=True, batch_size=4, max_steps=40, warmup_steps=5, lr_drop_step=1000,
        log_every=10, save_every=1000, num_workers=0))
    root = ensure_synthetic(tmp_path / "data", num_train=8, num_val=0, image_size=(128, 128), seed=0)
    result = train_module.train(config, tmp_path / "run", CocoPanoptic(root, "train2017"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert stage_configs(config)[0].dtype == "bfloat16" and result["steps"] == 40
    assert all(np.isfinite(losses))
    # the logged rows are means over 10 steps: steps 31-40 against steps 1-10
    assert losses[-1] < 0.75 * losses[0], losses
