"""Matcher and set-criterion timings on the current JAX backend (the CPU by default).

One step's matching = the final decoder layer plus `aux` earlier ones, all matched in one jitted
call (the scipy method makes a single host callback for all of them).  Timings are the median of
`repeats` runs after a warm-up; compile time is reported apart.

    python bench/bench_matcher.py [--slots 100] [--repeats 7]

`run_benchmark(...)` returns the timings as a dict, for the lead's train-step measurements.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.config import DataConfig, LossConfig
from detr_jax.losses import set_criterion
from detr_jax.matcher import hungarian_match


def make_batch(batch: int, queries: int, num_logits: int, objects: int, slots: int, aux: int,
               seed: int = 0):
    """Random DETR-like outputs (with `aux` aux layers) and targets with ~`objects` per image."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.poisson(objects, batch), 1, min(slots, queries))
    valid = np.arange(slots)[None] < counts[:, None]

    def boxes(*shape):
        return np.concatenate([rng.uniform(0.2, 0.8, shape + (2,)),
                               rng.uniform(0.05, 0.4, shape + (2,))], -1).astype(np.float32)

    def layer():
        return {"pred_logits": rng.normal(size=(batch, queries, num_logits)).astype(np.float32),
                "pred_boxes": boxes(batch, queries)}

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(aux)]
    targets = {"labels": rng.integers(0, num_logits - 1, (batch, slots)).astype(np.int32),
               "boxes": np.where(valid[..., None], boxes(batch, slots), 0).astype(np.float32),
               "valid": valid}
    return jax.device_put(outputs), jax.device_put(targets)


def _time(fn: Callable, *args, repeats: int) -> Dict[str, float]:
    """Compile seconds and the median / min wall seconds of `repeats` runs after one warm-up."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "median_s": statistics.median(runs), "min_s": min(runs)}


def run_benchmark(batch: int = 4, queries: int = 100, num_logits: int = 251, objects: int = 20,
                  slots: int = DataConfig().max_boxes, aux: int = 5,
                  repeats: int = 7) -> Dict[str, Dict[str, float]]:
    """Timings of the two matchers (all `aux + 1` layers) and of the jitted value_and_grad of the
    detection set criterion with each."""
    outputs, targets = make_batch(batch, queries, num_logits, objects, slots, aux)
    stacked = {k: jnp.stack([o[k] for o in outputs["aux_outputs"]] + [outputs[k]])
               for k in ("pred_logits", "pred_boxes")}
    results = {}
    for method in ("scipy", "device"):
        def match_all(layers, tgt, method=method):
            return jax.vmap(lambda o: hungarian_match(o, tgt, method=method))(layers)

        config = LossConfig(matcher=method, aux_loss=aux > 0)

        def loss_grad(out, tgt, config=config):
            return jax.value_and_grad(lambda o: set_criterion(o, tgt, config)["loss"])(out)

        results[f"matcher {method} ({aux + 1} matchings)"] = _time(
            match_all, stacked, targets, repeats=repeats)
        results[f"set_criterion value_and_grad, {method}"] = _time(
            loss_grad, outputs, targets, repeats=repeats)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--num-logits", type=int, default=251)
    parser.add_argument("--objects", type=int, default=20, help="mean targets per image")
    parser.add_argument("--slots", type=int, default=DataConfig().max_boxes,
                        help="padded target slots M")
    parser.add_argument("--aux", type=int, default=5, help="aux decoder layers")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    results = run_benchmark(args.batch, args.queries, args.num_logits, args.objects, args.slots,
                            args.aux, args.repeats)
    print(f"`python bench/bench_matcher.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
          f" on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)): batch "
          f"{args.batch}, {args.queries} queries, {args.num_logits} logits, ~{args.objects} "
          f"objects per image padded to {args.slots}, {args.aux} aux layers\n")
    print("| what | median ms | min ms | compile s |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in results.items():
        print(f"| {name} | {1e3 * t['median_s']:.2f} | {1e3 * t['min_s']:.2f} | "
              f"{t['compile_s']:.2f} |")


if __name__ == "__main__":
    main()
