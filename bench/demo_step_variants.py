"""The demo detector's train step under config variants, timed in pairs: what each change costs.

Builds the train step of `detr-jax demo`'s detector stage (`detr_jax/configs/demo.py`, as the
train loop builds it: the runtime's policy, the training-only accelerators) once per variant, on
the same 8 batches of the demo's synthetic data, compiles each, then calls them round-robin,
`--calls` steps of each per round, for `--rounds` rounds.  Interleaving puts every variant under
the same machine load, so the ratios hold on a noisy machine where timings taken one after the
other do not.  Prints the median step of each variant and its ratio to the first; the loader and
the loop's own work are not in it.

    python bench/demo_step_variants.py "" "train.denoising.groups=1" "loss.matcher=device" \\
        [--rounds 30] [--calls 3] [--data DIR]

A variant is a comma-separated list of SECTION.FIELD=VALUE overrides of the detector stage's
config (`demo_convergence.apply_overrides`, as its `--set`; a nested field as
SECTION.FIELD.SUB=VALUE); "" is the demo as it is.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from demo_convergence import apply_overrides  # noqa: E402

BATCHES = 8


def build_step(config, batches):
    """(the jitted step, its state, the batches on the device, rng) of `config`, as `train` builds them."""
    from detr_jax import encoder_supervision, optim, training_queries
    from detr_jax import train as loop
    from detr_jax.models.detr import DETR

    tc = config.train
    model_config, loss_config = loop.stage_configs(config)
    queries = training_queries.build(tc, model_config)
    encoder = encoder_supervision.build(tc, model_config)
    init_rng, step_rng = loop.run_keys(tc.seed)
    abstract = loop.abstract_variables(model_config)["params"]
    extra = loop.training_only_params(queries, encoder, None, abstract=True)
    if extra is not None:
        abstract = {**abstract, loop.TRAINING_ONLY: extra}
    steps_per_epoch = 1000   # the schedule's epoch length only matters for epoch-based drops
    optimizer = optim.make_optimizer(abstract, tc, steps_per_epoch)
    state = loop.initial_state(config, model_config, optimizer, None, init_rng, queries, encoder)
    step = loop.make_train_step(DETR(model_config), loss_config, optimizer,
                                optim.lr_schedule(tc.lr, tc, steps_per_epoch), optim.trainable_mask(state.params, tc),
                                padding_invariant=tc.padding_invariant, queries=queries, encoder=encoder)
    keys = loop.MODEL_INPUTS + loop.TARGETS + (("masks",) if loss_config.masks else ())
    return (loop.make_parallel_train_step(step), loop.replicate_on_devices(state),
            [loop.shard_batch(b, keys) for b in batches], loop.replicate(step_rng))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='comma-separated overrides per variant; "" for the demo')
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=3, help="steps of each variant per round")
    parser.add_argument("--data", default=str(pathlib.Path(tempfile.gettempdir()) / "detr_jax_demo_data"))
    args = parser.parse_args()

    import jax

    from detr_jax.config import load_config
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.synthetic import ensure_synthetic
    from detr_jax.demo import DATASET
    from detr_jax.train import make_loader

    dataset = CocoPanoptic(ensure_synthetic(args.data, **DATASET), "train2017")
    runs = []
    for variant in args.variants:
        config = apply_overrides(load_config("demo"), filter(None, variant.split(",")))
        loader = make_loader(dataset, dataclasses.replace(config, train=dataclasses.replace(config.train, num_workers=0)))
        batches = loader.iterate(0)
        step, state, device_batches, rng = build_step(config, [next(batches) for _ in range(BATCHES)])
        begin = time.perf_counter()
        state, metrics = step(state, device_batches[0], rng)
        jax.block_until_ready(metrics)
        runs.append(dict(name=variant or "demo", step=step, state=state, batches=device_batches, rng=rng,
                         compile_s=time.perf_counter() - begin, times=[]))
    for round_index in range(args.rounds):
        for run in runs:
            for call in range(args.calls):
                batch = run["batches"][(round_index * args.calls + call) % BATCHES]
                begin = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], batch, run["rng"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - begin)
    first = statistics.median(runs[0]["times"])
    print("| variant | median step ms | ratio | compile s |\n|---|---:|---:|---:|")
    for run in runs:
        median = statistics.median(run["times"])
        print(f"| {run['name']} | {1000 * median:.1f} | {median / first:.2f} | {run['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
