"""The Hungarian matching's share of a whole train step, measured in one run on the CPU.

    python bench/bench_matcher_share.py                      # demo model, batch 4, 128x128 synthetic data
    python bench/bench_matcher_share.py --config detr_tiny --batch 4

Times (median after warm-up) the jitted train step (forward, 1 + aux scipy matchings through the
host callback, losses, backward, AdamW update) and, on that step's own outputs and targets, the
same matchings alone (the cost matrices on the device plus scipy through `jax.pure_callback`).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of `fn` (blocked on its result) after a first, compiling call."""
    return common.time_calls(lambda: jax.block_until_ready(fn()), repeats)["median_s"]


def run(config_name: str, batch_size: int, repeats: int) -> dict:
    from detr_jax import optim
    from detr_jax.config import load_config
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.loader import Loader
    from detr_jax.data.synthetic import generate
    from detr_jax.data.transforms import TrainTransform
    from detr_jax.matcher import hungarian_match
    from detr_jax.models import DETR, init_variables
    from detr_jax.train import TARGETS, make_train_step
    from detr_jax.train_state import create_train_state

    config = load_config(config_name)
    size = config.data.train_scales[-1]
    root = generate(tempfile.mkdtemp(), num_train=batch_size, num_val=1, image_size=(size, size))
    loader = Loader(CocoPanoptic(root, "train2017"), batch_size, TrainTransform(config.data), config=config.data)
    batch = next(loader.iterate())
    model_config, loss_config = config.model, dataclasses.replace(config.loss, matcher="scipy")
    variables = init_variables(model_config, jax.random.PRNGKey(0), (size, size))
    optimizer = optim.make_optimizer(variables["params"], config.train, steps_per_epoch=1)
    state = create_train_state(variables, optimizer)
    step = jax.jit(make_train_step(DETR(model_config), loss_config, optimizer,
                                   optim.lr_schedule(config.train.lr, config.train, 1),
                                   optim.trainable_mask(state.params, config.train), axis_name=None))
    keys = TARGETS + (("masks",) if loss_config.masks else ())
    inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask") + keys}
    rng = jax.random.PRNGKey(1)
    step_s = median_seconds(lambda: step(state, inputs, rng)[1]["loss"], repeats)

    outputs = jax.jit(DETR(model_config).apply)(variables, batch["pixel_values"], batch["pixel_mask"])
    targets = {k: batch[k] for k in TARGETS}
    layers = [outputs] + outputs.get("aux_outputs", [])
    match_all = jax.jit(lambda layers, t: [hungarian_match(o, t, cost_class=loss_config.cost_class,
                                                           cost_bbox=loss_config.cost_bbox,
                                                           cost_giou=loss_config.cost_giou) for o in layers])
    match_s = median_seconds(lambda: match_all(layers, targets), repeats)
    return {"config": config_name, "batch": batch_size, "image": size, "matchings": len(layers),
            "step_ms": 1e3 * step_s, "matching_ms": 1e3 * match_s, "share": match_s / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    r = run(args.config, args.batch, args.repeats)
    print(f"command: python {' '.join(sys.argv)}")
    print("| model | batch x image | matchings | train step ms | matching ms (callback incl.) | share |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| {r['config']} | {r['batch']} x {r['image']}x{r['image']} | {r['matchings']} | {r['step_ms']:.0f} | "
          f"{r['matching_ms']:.2f} | {100 * r['share']:.2f} % |")


if __name__ == "__main__":
    main()
