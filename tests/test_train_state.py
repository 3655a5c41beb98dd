"""Training checkpoints: resuming survives a damaged newest checkpoint, and never silently starts
from scratch over a workdir that holds checkpoints."""
import dataclasses
import logging
import pathlib

import numpy as np
import pytest

from detr_jax.train_state import CheckpointRestoreError, Checkpoints, TrainState


def toy_state(step: int) -> TrainState:
    return TrainState(step=np.array(step, np.int32), params={"w": np.full((8, 8), step, np.float32)},
                      buffers={}, opt_state={"m": np.full(3, -step, np.float32)})


def save_steps(workdir: pathlib.Path, steps, keep: int = 3) -> None:
    checkpoints = Checkpoints(workdir, keep)
    for step in steps:
        checkpoints.save(toy_state(step), {"step": step})
    checkpoints.wait()
    checkpoints.close()


def damage(workdir: pathlib.Path, step: int, how: str) -> None:
    """Truncates, or deletes, every array data file of checkpoint `step`."""
    files = [p for p in (workdir / "checkpoints" / str(step)).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        if how == "truncated":
            path.write_bytes(path.read_bytes()[:10])
        else:
            path.unlink()


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_restored(tmp_path, caplog, how):
    save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path, 3, how)
    checkpoints = Checkpoints(tmp_path, 3)
    with caplog.at_level(logging.WARNING, logger="detr_jax.train_state"):
        state = checkpoints.restore_latest(toy_state(0))
    assert int(state.step) == 2 and (state.params["w"] == 2).all() and (state.opt_state["m"] == -2).all()
    lines = [r.getMessage() for r in caplog.records if r.name == "detr_jax.train_state"]
    assert len(lines) == 1 and "step 3" in lines[0] and "cannot be restored" in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 800
    assert (tmp_path / "checkpoints_damaged" / "3").is_dir() and checkpoints.all_steps() == [1, 2]
    checkpoints.save(toy_state(3), {})   # the run can save that step again
    checkpoints.wait()
    assert checkpoints.all_steps() == [1, 2, 3]
    checkpoints.close()


def test_no_checkpoint_that_restores_is_a_clear_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    damage(tmp_path, 1, "missing")
    damage(tmp_path, 2, "truncated")
    checkpoints = Checkpoints(tmp_path, 3)
    for attempt in range(2):   # the same answer on the next try: nothing was moved away
        with pytest.raises(CheckpointRestoreError, match=r"no checkpoint .* can be restored(.|\n)*step 2: (.|\n)*step 1: "):
            checkpoints.restore_latest(toy_state(0))
        assert checkpoints.all_steps() == [1, 2]
    checkpoints.close()


def test_train_resumes_past_a_truncated_checkpoint(tmp_path, caplog, monkeypatch):
    """`train()` with a stand-in step and zero variables (the resume path, not the model, is
    under test): two steps
    saved, the second truncated; running again resumes from step 1 and trains on to the end."""
    import jax
    import jax.numpy as jnp

    from detr_jax import train as train_module
    from detr_jax.config import load_config
    from detr_jax.data import synthetic
    from detr_jax.data.coco import CocoDetection

    def counting_step(*unused, **unused_kw):
        def step(state, batch, rng):   # every parameter moves by 1 per step, so the start shows
            params = jax.tree.map(lambda p: p + 1.0, state.params)
            loss = jnp.mean(batch["pixel_values"]) * 0.0 + 1.0
            return state.replace(step=state.step + 1, params=params), {"loss": loss, "lr": jnp.float32(0.0)}
        return step

    def zero_variables(model_config, rng):   # the model's tree without compiling its initializers
        shapes = jax.eval_shape(train_module.DETR(model_config).init, rng, jnp.zeros((1, 32, 32, 3)),
                                jnp.ones((1, 32, 32), bool))
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    monkeypatch.setattr(train_module, "make_train_step", counting_step)
    monkeypatch.setattr(train_module, "init_variables", zero_variables)
    config = load_config("detr_tiny")
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, train_scales=(32,), train_max_size=32, crop_prob=0.0),
        train=dataclasses.replace(config.train, stage="detection", batch_size=1, max_steps=2, save_every=1, keep_checkpoints=3,
                                  log_every=1, num_workers=0))
    root = synthetic.generate(tmp_path / "data", num_train=2, num_val=0, image_size=(32, 32), seed=0)
    dataset = CocoDetection(root, "train2017")
    workdir = tmp_path / "run"
    first = train_module.train(config, workdir, dataset, progress=False)
    damage(workdir, 2, "truncated")
    with caplog.at_level(logging.WARNING):
        result = train_module.train(config, workdir, dataset, max_steps=3, progress=False)
    assert "checkpoint step 2" in caplog.text and "resumed from" in caplog.text
    assert result["steps"] == 2 and int(result["state"].step) == 3
    before, after = first["state"].params["class_embed"]["bias"], result["state"].params["class_embed"]["bias"]
    np.testing.assert_allclose(after, before + 1.0)   # step 1's parameters + 2 steps (step 2's + 1 would be + 2)
