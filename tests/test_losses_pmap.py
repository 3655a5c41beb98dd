"""Data parallel: under `pmap` on 2 CPU devices, the pmean of the losses and of the gradients
equals the single-device values for the same global batch, with both matchers (the scipy host
callback included).

The device count must be fixed before JAX starts, so the check runs in a fresh interpreter.
"""
import json
import os
import subprocess
import sys

from conftest import REPO, with_test_xla_flags

CHECK = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from detr_jax.config import LossConfig
from detr_jax.losses import set_criterion

assert jax.device_count() == 2, jax.devices()
rng = np.random.default_rng(0)
B, Q, K, M = 4, 8, 5, 3                      # global batch 4: 2 images per device
counts = np.array([3, 1, 0, 1])              # 4 objects on device 0, 1 on device 1
valid = np.arange(M)[None] < counts[:, None]
def boxes(*shape):
    return np.concatenate([rng.uniform(0.3, 0.7, shape + (2,)),
                           rng.uniform(0.1, 0.4, shape + (2,))], -1).astype(np.float32)
targets = {"labels": rng.integers(0, K - 1, (B, M)).astype(np.int32),
           "boxes": np.where(valid[..., None], boxes(B, M), 0).astype(np.float32), "valid": valid,
           "masks": (rng.uniform(size=(B, M, 8, 12)) < 0.4) & valid[..., None, None]}
outputs = {"pred_logits": rng.normal(size=(B, Q, K)).astype(np.float32),
           "pred_boxes": boxes(B, Q),
           "pred_masks": rng.normal(size=(B, Q, 4, 6)).astype(np.float32),
           "aux_outputs": [{"pred_logits": rng.normal(size=(B, Q, K)).astype(np.float32),
                            "pred_boxes": boxes(B, Q)}]}
shard = lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:])
report = {}
for method in ("scipy", "device"):
    config = LossConfig(masks=True, aux_loss=True, matcher=method)
    def loss_and_grads(out, tgt, axis_name=None):
        def total(o):
            terms = set_criterion(o, tgt, config, axis_name=axis_name)
            return terms["loss"], terms
        (_, terms), grads = jax.value_and_grad(total, has_aux=True)(out)
        if axis_name is not None:       # what a data-parallel train step does
            terms = jax.lax.pmean(terms, axis_name)
            grads = jax.tree.map(lambda g: g / jax.lax.psum(1, axis_name), grads)
        return terms, grads
    terms, grads = jax.jit(loss_and_grads)(outputs, targets)
    p_terms, p_grads = jax.pmap(lambda o, t: loss_and_grads(o, t, "batch"), axis_name="batch")(
        jax.tree.map(shard, outputs), jax.tree.map(shard, targets))
    report[method] = {
        "keys_equal": sorted(terms) == sorted(p_terms),
        "term_rel": max(abs(float(p_terms[k][0]) - float(terms[k]))
                        / max(abs(float(terms[k])), 1e-6) for k in terms),
        "grad_rel": max(float(np.abs(np.asarray(pg).reshape(g.shape) - g).max() / np.abs(g).max())
                        for pg, g in zip(jax.tree.leaves(p_grads), jax.tree.leaves(grads))),
        "loss": float(terms["loss"]),
    }
print("REPORT" + json.dumps(report))
"""


def test_pmap_equals_single_device_for_the_same_global_batch():
    env = dict(os.environ, XLA_FLAGS=with_test_xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    for method, result in report.items():
        assert result["keys_equal"], method
        assert result["term_rel"] < 1e-5, (method, result)
        assert result["grad_rel"] < 1e-5, (method, result)
    assert abs(report["scipy"]["loss"] - report["device"]["loss"]) < 1e-6 * report["scipy"]["loss"]
