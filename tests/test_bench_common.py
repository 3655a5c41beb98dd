"""The bench's FLOP count (bench/common.py) counts what the program executes."""
import functools
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402

from detr_jax.models.transformer import blocked_attention  # noqa: E402


def test_executed_gflops_counts_every_attention_block():
    b, n, heads, d = 1, 1000, 2, 16          # 2 heads x 8 blocks of 125 queries (a lax.map loop)
    q, k, v = (np.ones((b, n, heads, d), np.float32) for _ in range(3))
    core = functools.partial(blocked_attention, query_chunk=128)
    matmuls = 2 * 2 * b * heads * n * n * d / 1e9           # q k^T and (weights) v
    executed = common.executed_gflops(jax.jit(core), q, k, v)
    assert matmuls <= executed <= 1.5 * matmuls            # plus the softmax's elementwise work
    cost = jax.jit(core).lower(q, k, v).cost_analysis()
    loop_once = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) / 1e9
    assert loop_once < executed / 4                        # XLA alone counts one block of the loop


def test_compare_torch_pairs_each_rounds_jax_run_with_that_rounds_torch_run():
    import compare_torch

    def run(case, framework, round_index, median_s):
        return {"case": case, "framework": framework, "round": round_index, "median_s": median_s}

    results = [run("panoptic_photo", "jax", 0, 3.0), run("panoptic_photo", "torch", 0, 15.0),
               run("panoptic_photo", "jax", 1, 2.5), run("panoptic_photo", "torch", 1, 12.5),
               run("panoptic_photo", "jax", 2, 2.0), {"case": "panoptic_photo", "framework": "torch", "round": 2,
                                                       "error": "timed out"},
               run("detection_b1", "jax", 0, 1.0), run("detection_b1", "torch", 0, 2.0)]
    pairs = {(case, fw): ratios for case, fw, ratios in compare_torch.paired_ratios(results)}
    assert pairs == {("panoptic_photo", "torch"): [0.2, 0.2], ("detection_b1", "torch"): [0.5]}
