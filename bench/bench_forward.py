"""Time the jitted DETR forward on the CPU: compile time apart, median of several runs, peak RSS.

    python bench/bench_forward.py                                  # R50-DC5 panoptic, 1x800x1066
    python bench/bench_forward.py --config detr_r50 --batch 4 --repeats 5

Weights: the reference recipe (../shared/fixtures/detr_reference) when the config is the recipe's
R50-DC5 panoptic and the fixture is present, otherwise random weights of the right shapes (the
timing does not depend on the values; frozen BN gets unit statistics so activations stay finite).
Each run is a fresh process so that peak RSS belongs to this case alone.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def random_variables(config, seed=0):
    from flax.traverse_util import flatten_dict, unflatten_dict

    from detr_jax.models import abstract_variables

    shapes = abstract_variables(config)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in flatten_dict(shapes).items():
        if path[0] == "buffers":
            flat[path] = np.ones(s.shape, np.float32) if path[-1] in ("weight", "running_var") else \
                np.zeros(s.shape, np.float32)
        elif path[-1] in ("scale",):
            flat[path] = np.ones(s.shape, np.float32)
        else:
            fan_in = int(np.prod(s.shape[:-1])) or 1
            flat[path] = (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
    return unflatten_dict(flat)


def recipe_variables(config):
    """The converted reference recipe, or None when the fixture folder is absent."""
    import importlib.util

    folder = pathlib.Path(os.environ.get("DETR_REFERENCE_DIR", pathlib.Path(__file__).resolve().parents[2]
                                         / "shared" / "fixtures" / "detr_reference"))
    if not (folder / "make_checkpoint.py").exists():
        return None
    spec = importlib.util.spec_from_file_location("make_checkpoint", folder / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from detr_jax.convert import convert_state_dict

    return convert_state_dict(module.make_state_dict(20), config)


def run_case(config_name: str, batch: int, height: int, width: int, repeats: int,
             mask_queries=None) -> dict:
    import jax

    from detr_jax.runtime import DETRModel
    from detr_jax.config import load_config

    config = load_config(config_name).model
    variables = recipe_variables(config) if config_name == "detr_r50_dc5_panoptic" else None
    weights = "recipe" if variables is not None else "random"
    model = DETRModel(config, variables if variables is not None else random_variables(config))
    x = np.random.default_rng(0).standard_normal((batch, height, width, 3)).astype(np.float32)
    mask = np.ones((batch, height, width), bool)
    timing = common.time_calls(lambda: jax.block_until_ready(model(x, mask, mask_queries=mask_queries)), repeats)
    gflops = common.model_gflops(model.module, model.variables, x, mask, mask_queries=mask_queries)
    return {"config": config_name, "batch": batch, "mask_queries": mask_queries, "hw": [height, width], "weights": weights,
            "compile_s": timing["first_s"] - timing["median_s"], "median_s": timing["median_s"],
            "min_s": timing["min_s"], "max_s": timing["max_s"], "repeats": repeats,
            "gflops": gflops,
            "peak_rss_mb": common.peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="detr_r50_dc5_panoptic")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mask-queries", type=int, help="run the mask head on the K best queries only")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run_case(args.config, args.batch, args.height, args.width, args.repeats, args.mask_queries)
    m = common.machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}, Python {m['python']}, "
          f"jax {m['jax']}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| model | input | mask queries | weights | compile s | median s | min-max s | GFLOPs | peak RSS MB |")
    print("|---|---|---:|---|---:|---:|---|---:|---:|")
    r = result
    print(f"| {r['config']} | {r['batch']}x{r['hw'][0]}x{r['hw'][1]} | {r['mask_queries'] or 'all'} | "
          f"{r['weights']} | {r['compile_s']:.1f} | "
          f"{r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['gflops']:.0f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
