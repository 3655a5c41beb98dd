"""The bench's FLOP count (bench/common.py) counts what the program executes."""
import functools
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402

from detr_jax.models.transformer import attention_core  # noqa: E402


def test_executed_gflops_counts_every_attention_block():
    b, n, heads, d = 1, 1000, 2, 16          # 1000 queries run in 8 blocks of 125 (a lax.map loop)
    q, k, v = (np.ones((b, n, heads, d), np.float32) for _ in range(3))
    core = functools.partial(attention_core, query_chunk=128)
    matmuls = 2 * 2 * b * heads * n * n * d / 1e9           # q k^T and (weights) v
    executed = common.executed_gflops(jax.jit(core), q, k, v)
    assert matmuls <= executed <= 1.5 * matmuls            # plus the softmax's elementwise work
    cost = jax.jit(core).lower(q, k, v).cost_analysis()
    loop_once = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) / 1e9
    assert loop_once < executed / 4                        # XLA alone counts one block of the loop
