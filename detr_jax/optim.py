"""The original DETR's optimizer: AdamW with a lower backbone lr, a step lr drop, clipping, freezing.

Every parameter gets a label from its path (`backbone/layer2_0/conv1/kernel`):

    frozen    no update at all, no weight decay: TrainConfig.frozen (the stem and layer1, as the
              original freezes them), and in the "masks" stage everything but
              TrainConfig.mask_trainable (the original's `--frozen_weights` stage 2)
    backbone  AdamW at `lr_backbone`
    default   AdamW at `lr`

The chain is the original's order of operations: the gradients of frozen parameters are dropped
(PyTorch skips parameters without `requires_grad`), the remaining ones are clipped to a global
norm of `clip_max_norm`, then AdamW (decoupled weight decay `weight_decay` on every trainable
parameter) with the learning rate of the label's group.  The frozen-BatchNorm `buffers`
collection is not part of the optimized tree at all.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from detr_jax.config import TrainConfig

FROZEN, BACKBONE, DEFAULT = "frozen", "backbone", "default"
STAGES = ("all", "detection", "masks")


def param_label(path: str, config: TrainConfig) -> str:
    """The group of the parameter at `path` ("a/b/kernel"): FROZEN, BACKBONE or DEFAULT."""
    if config.stage not in STAGES:
        raise ValueError(f"unknown training stage {config.stage!r}; use one of {STAGES}")
    if any(path.startswith(p) for p in config.frozen):
        return FROZEN
    if config.stage == "masks" and not any(path.startswith(p) for p in config.mask_trainable):
        return FROZEN
    return BACKBONE if path.startswith("backbone/") else DEFAULT


def param_labels(params: Dict[str, Any], config: TrainConfig) -> Dict[str, Any]:
    """A tree like `params` holding each leaf's label."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: param_label(k, config) for k in flat}, sep="/")


def trainable_mask(params: Dict[str, Any], config: TrainConfig) -> Dict[str, Any]:
    """A tree like `params`: True where the parameter trains."""
    return jax.tree.map(lambda label: label != FROZEN, param_labels(params, config))


def lr_drop_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """First step at the dropped lr: `lr_drop_step`, else `lr_drop_epochs` epochs (StepLR per epoch)."""
    return config.lr_drop_step if config.lr_drop_step is not None else config.lr_drop_epochs * steps_per_epoch


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of the whole run: `max_steps`, else `epochs` epochs."""
    return config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch


def lr_schedule(base_lr: float, config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """`lr_decay="step"`: `base_lr` until the drop step, times `lr_drop_factor` after; optional
    linear warm-up.  `"cosine"`: linear warm-up from 0, then cosine down to 0 at the last step."""
    if config.lr_decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, base_lr, config.warmup_steps,
                                                  max(total_steps(config, steps_per_epoch), config.warmup_steps + 1))
    if config.lr_decay != "step":
        raise ValueError(f"unknown lr_decay {config.lr_decay!r}: 'step' or 'cosine'")
    drop = lr_drop_step(config, steps_per_epoch)
    warmup = config.warmup_steps

    def schedule(step):
        lr = jnp.where(step >= drop, base_lr * config.lr_drop_factor, base_lr)
        if warmup > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
        return jnp.asarray(lr, jnp.float32)

    return schedule


def make_optimizer(params: Dict[str, Any], config: TrainConfig,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """The full chain (module docstring) for `params` (the `params` collection only)."""
    labels = param_labels(params, config)
    frozen = jax.tree.map(lambda label: label == FROZEN, labels)
    adamw: Callable[[float], optax.GradientTransformation] = lambda lr: optax.adamw(  # noqa: E731
        lr_schedule(lr, config, steps_per_epoch), b1=0.9, b2=0.999, eps=config.adam_eps,
        weight_decay=config.weight_decay)
    return optax.chain(
        optax.masked(optax.set_to_zero(), frozen),   # so that clipping sees trainable gradients only
        optax.clip_by_global_norm(config.clip_max_norm) if config.clip_max_norm > 0 else optax.identity(),
        optax.multi_transform({DEFAULT: adamw(config.lr), BACKBONE: adamw(config.lr_backbone),
                               FROZEN: optax.set_to_zero()}, labels),
    )


def count_by_label(params: Dict[str, Any], config: TrainConfig) -> Dict[str, int]:
    """Number of scalars per label, for the start-of-training summary."""
    counts = {FROZEN: 0, BACKBONE: 0, DEFAULT: 0}
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, value in flat.items():
        counts[param_label(path, config)] += int(value.size)
    return counts
