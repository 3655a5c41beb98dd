"""One training step of DETR R50-DC5 panoptic on the current JAX backend (the CPU by default).

The step is the library's `make_train_step` jitted on one device: forward, Hungarian matching
(scipy, one host callback for the 6 decoder layers), every loss (masks included), backward and
the AdamW update, for a random-init model.  Cases: batch 1 at 800x1066 and batch 2 at 512x683,
20 objects per image among 100 target slots.  Reported: compile time, median and min of
`--repeats` steps after one warm-up step, the peak RSS of the process (getrusage), and the
Hungarian matching's share of the step, measured two ways: the same step with the matcher
replaced by a fixed assignment (query i -> target i), and the host callback timed alone on cost
matrices of the step's shape.

    python bench/bench_train_step.py [--repeats 3] [--cases b1_800x1066,b2_512x683] [--config NAME]
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import losses, optim
from detr_jax.config import load_config
from detr_jax.matcher import _scipy_host, match_cost
from detr_jax.models.detr import DETR, init_variables
from detr_jax.train import make_train_step, stage_configs
from detr_jax.train_state import create_train_state

CASES = {"b1_800x1066": (1, 800, 1066), "b2_512x683": (2, 512, 683)}
OBJECTS = 20


def make_batch(batch: int, h: int, w: int, slots: int, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = np.arange(slots)[None] < np.full((batch, 1), OBJECTS)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, slots, 2)), rng.uniform(0.05, 0.4, (batch, slots, 2))], -1)
    return {"pixel_values": rng.normal(size=(batch, h, w, 3)).astype(np.float32),
            "pixel_mask": np.ones((batch, h, w), bool),
            "labels": rng.integers(0, 250, (batch, slots)).astype(np.int32),
            "boxes": np.where(valid[..., None], boxes, 0).astype(np.float32), "valid": valid,
            "masks": (rng.uniform(size=(batch, slots, h, w)) < 0.1) & valid[..., None, None]}


def fixed_match(outputs, targets, **unused):
    """Query i -> target slot i where that slot is valid: matching without the Hungarian algorithm."""
    b, q = outputs["pred_logits"].shape[:2]
    slots = targets["valid"].shape[-1]
    index = jnp.broadcast_to(jnp.arange(q), (b, q))
    ok = (index < slots) & jnp.take_along_axis(targets["valid"], jnp.clip(index, 0, slots - 1), axis=1)
    return jnp.where(ok, index, -1).astype(jnp.int32)


def time_step(step, state, batch, rng, repeats: int) -> Dict[str, float]:
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t
    state, metrics = compiled(state, batch, rng)          # warm-up
    jax.block_until_ready(metrics)
    times: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
            "loss": float(metrics["loss"])}


def time_host_matcher(outputs_shape, batch, repeats: int) -> float:
    """Median seconds of the scipy host function on [layers, B, Q, M] costs like the step's."""
    layers, b, q, c = outputs_shape
    rng = np.random.default_rng(1)
    out = {"pred_logits": jnp.asarray(rng.normal(size=(layers * b, q, c)), jnp.float32),
           "pred_boxes": jnp.asarray(rng.uniform(0.1, 0.6, (layers * b, q, 4)), jnp.float32)}
    tgt = {k: jnp.asarray(np.concatenate([batch[k]] * layers)) for k in ("labels", "boxes", "valid")}
    cost = np.asarray(match_cost(out, tgt)).reshape(layers, b, q, -1)
    valid = np.broadcast_to(batch["valid"], (layers,) + batch["valid"].shape)
    times = []
    for _ in range(max(repeats, 3)):
        t = time.perf_counter()
        _scipy_host(cost, valid)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_case(config, name: str, repeats: int) -> Dict[str, float]:
    batch_size, h, w = CASES[name]
    model_config, loss_config = stage_configs(config)
    variables = jax.tree.map(np.asarray, init_variables(model_config, jax.random.PRNGKey(0)))
    optimizer = optim.make_optimizer(variables["params"], config.train, steps_per_epoch=1000)
    make = lambda: make_train_step(DETR(model_config), loss_config, optimizer,  # noqa: E731
                                   optim.lr_schedule(config.train.lr, config.train, 1000),
                                   optim.trainable_mask(variables["params"], config.train), axis_name=None)
    batch = make_batch(batch_size, h, w, config.data.max_boxes)
    rng = np.asarray(jax.random.PRNGKey(1))
    result = time_step(make(), create_train_state(variables, optimizer), batch, rng, repeats)
    original = losses.hungarian_match
    losses.hungarian_match = fixed_match      # the same step without the Hungarian matching
    try:
        fixed = time_step(make(), create_train_state(variables, optimizer), batch, rng, repeats)
    finally:
        losses.hungarian_match = original
    layers = model_config.dec_layers
    host = time_host_matcher((layers, batch_size, model_config.num_queries, model_config.num_logits), batch, repeats)
    return dict(result, fixed_median_s=fixed["median_s"], host_matcher_s=host,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="detr_r50_dc5_panoptic")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, stage="all"))
    print(f"`python bench/bench_train_step.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
          f"on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{args.config}, random init, {OBJECTS} objects / image\n")
    print("| case | compile s | step median s | step min s | step w/o matching s | matching share "
          "| host matcher ms | peak RSS GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.cases.split(","):
        r = run_case(config, name, args.repeats)
        share = 1 - r["fixed_median_s"] / r["median_s"]
        print(f"| {name} | {r['compile_s']:.1f} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['fixed_median_s']:.2f} "
              f"| {100 * share:.1f}% (callback alone {100 * r['host_matcher_s'] / r['median_s']:.2f}%) "
              f"| {1e3 * r['host_matcher_s']:.1f} | {r['peak_rss_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
