"""Compile time of R50-DC5 panoptic at one shape, and JAX's persistent compilation cache at work.

Runs the same first call (lower + compile + run of the jitted forward at 1x800x1066, mask head on
the 32 best queries as the Predictor does) in fresh processes, one after the other:

  1. no persistent cache: the compile time every new process pays by default;
  2. with an empty cache folder (`JAX_COMPILATION_CACHE_DIR`): compiles and writes the cache;
  3. a second process on the same folder: reads the compiled program instead of compiling.

    python bench/bench_compile.py [--size 800x1066] [--mask-queries 32]

Reported per process: lower (tracing) seconds, compile seconds (`.compile()`; a cache hit makes it
a file read), the first run, and the cache folder's size.  Weights are random (compile time does
not depend on values).  Enabling the cache in your own runs:

    export JAX_COMPILATION_CACHE_DIR=~/.cache/detr_jax/xla   # or jax.config.update("jax_compilation_cache_dir", ...)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def child(size: str, mask_queries: int) -> dict:
    start = time.perf_counter()
    import jax
    import numpy as np

    from bench_forward import random_variables
    from detr_jax.config import load_config
    from detr_jax.runtime import DETRModel

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # cache every program however fast it compiled, so the hit is complete
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    imported = time.perf_counter() - start
    config = load_config("detr_r50_dc5_panoptic").model
    variables = random_variables(config)
    h, w = (int(v) for v in size.split("x"))
    x = np.zeros((1, h, w, 3), np.float32)
    mask = np.ones((1, h, w), bool)
    model = DETRModel(config, variables)
    t = time.perf_counter()
    lowered = model.lower(x, mask)          # the model's program (the CPU policy: with the per-image mask head)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()                 # its first call: that program again, and the per-query mask head's
    jax.block_until_ready(model(x, mask, mask_queries=mask_queries))
    run_s = time.perf_counter() - t
    return {"import_s": imported, "lower_s": lower_s, "compile_s": compile_s, "first_run_s": run_s,
            "peak_rss_mb": common.peak_rss_mb()}


def spawn(size: str, mask_queries: int, cache_dir) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    cmd = [sys.executable, __file__, "--child", "--size", size, "--mask-queries", str(mask_queries)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def folder_mb(path) -> float:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file()) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="800x1066")
    parser.add_argument("--mask-queries", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.mask_queries)))
        return
    with tempfile.TemporaryDirectory() as cache:
        rows = [("no persistent cache", spawn(args.size, args.mask_queries, None), None)]
        rows.append(("empty cache (writes it)", spawn(args.size, args.mask_queries, cache), folder_mb(cache)))
        rows.append(("second process, same cache", spawn(args.size, args.mask_queries, cache), folder_mb(cache)))
    m = common.machine()
    print(f"machine: {m['cpu']}, {m['usable_cores']} cores, load {m['load_avg_1m']:.1f}, jax {m['jax']}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| process | lower s | compile s | first run s | cache MB |")
    print("|---|---:|---:|---:|---:|")
    for name, r, mb in rows:
        print(f"| {name} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['first_run_s']:.1f} | "
              f"{'-' if mb is None else f'{mb:.1f}'} |")


if __name__ == "__main__":
    main()
