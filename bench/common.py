"""Helpers shared by the bench scripts: thread limits, timing, peak RSS, float32 matmul peak, machine.

Thread control on the CPU (checked with jax 0.10.2 / torch 2.13): XLA's CPU client sizes its
intra-op thread pool from the CPUs the process may run on, and `XLA_FLAGS` has no thread-count
flag any more (`--intra_op_parallelism_threads=N` aborts with "Unknown flag"; the dash-less
`intra_op_parallelism_threads=N` of old advice is silently ignored). So `limit_threads(n)` pins
the process to n CPUs with `os.sched_setaffinity` BEFORE jax/torch are imported (honoured by both)
and also sets `torch.set_num_threads(n)` (call `torch_threads`) and `--xla_cpu_multi_thread_eigen=true`.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, Optional

MATMUL_N = 2048


def limit_threads(n: Optional[int]) -> int:
    """Pin this process to `n` of its allowed CPUs (all if None); call before importing jax/torch."""
    allowed = sorted(os.sched_getaffinity(0))
    n = len(allowed) if not n else min(n, len(allowed))
    os.sched_setaffinity(0, allowed[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=true").strip()
    return n


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 0) -> Dict[str, float]:
    """first_s (the first call: compilation for jit), then `warmup` untimed calls, then `repeats`
    timed calls: median_s, min_s, max_s, runs_s.  `fn` must block until its result is ready."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
            "runs_s": runs}


def executed_gflops(fn: Callable, *args, **kwargs) -> float:
    """GFLOPs that `fn(*args, **kwargs)` executes, from XLA's cost analysis of its lowering.

    XLA counts the body of a loop once, whatever its trip count, and the attention over long
    sequences (the encoder's thousands of tokens) runs its query blocks in a loop (`lax.map`): a
    plain count misses all blocks but one (at 800x1066: 56 of the encoder's 124 GFLOPs counted).
    So `fn` is lowered with that loop as a vmap (`transformer.map_blocks`; the same arithmetic, not
    compiled or run).  `fn` may be jitted (its wrapped function is traced afresh).  A program
    that loops over the images of a batch (`DETRModel`) is also counted once: pass the module's
    `apply` (the batch at once, the same arithmetic) for batches of more than one.
    """
    from unittest import mock

    import jax

    from detr_jax.models import transformer

    plain = fn.__wrapped__ if hasattr(fn, "lower") else fn     # a jitted function: what it wraps
    with mock.patch.object(transformer, "map_blocks", lambda block, xs: jax.vmap(block)(xs)):
        cost = jax.jit(lambda *a, **k: plain(*a, **k), static_argnames=tuple(
            k for k, v in kwargs.items() if not hasattr(v, "shape"))).lower(*args, **kwargs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / 1e9


def model_gflops(module, variables, x, mask, mask_queries: Optional[int] = None, **apply_kwargs) -> float:
    """`executed_gflops` of a DETR `module` on the batch (x, mask) at once, the mask head (panoptic
    models) on `mask_queries` queries (None: every query), as `DETRModel` would compute them."""
    import jax.numpy as jnp

    from detr_jax.models import DETR

    if not module.config.masks or mask_queries is None:
        return executed_gflops(module.apply, variables, x, mask, **apply_kwargs)

    def detect_then_masks(variables, x, mask):
        out, features = module.apply(variables, x, mask, method=DETR.detect, **apply_kwargs)
        chosen = jnp.broadcast_to(jnp.arange(mask_queries, dtype=jnp.int32), (x.shape[0], mask_queries))
        return out, module.apply(variables, features, chosen, method=DETR.masks_of_queries)

    return executed_gflops(detect_then_masks, variables, x, mask)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(framework: str, n: int = MATMUL_N, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an n x n x n matmul (`jax` jnp.dot jitted, or `torch` torch.mm)."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        call = lambda: f(a, a).block_until_ready()  # noqa: E731
    else:
        import torch

        a = torch.randn(n, n, dtype=torch.float32)
        call = lambda: torch.mm(a, a)  # noqa: E731
    timing = time_calls(call, repeats, warmup=1)
    return 2 * n ** 3 / timing["min_s"] / 1e9


def machine() -> Dict[str, object]:
    """CPU model, logical cores (total / usable here), load average, Python and library versions."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()}
    for lib in ("jax", "jaxlib", "flax", "torch", "numpy"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info
