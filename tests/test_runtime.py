"""The inference runtime: execution policies, the model methods it builds on, the mask-query
policy, bf16, and the direction of the checkpoint / convert imports."""
import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_images
from detr_jax import runtime
from detr_jax.config import load_config
from detr_jax.models import DETR, abstract_variables, init_variables

TINY = load_config("detr_tiny").model     # panoptic: backbone, transformer, mask head


@pytest.fixture(scope="module")
def variables():
    return init_variables(TINY, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def cpu_model(variables):
    return runtime.DETRModel(TINY, variables, policy="cpu")


@pytest.fixture(scope="module")
def accelerator_model(variables):
    return runtime.DETRModel(TINY, variables, policy="accelerator")


def assert_trees_close(a, b, atol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_auto_picks_the_policy_of_the_backend():
    assert jax.default_backend() == "cpu"
    assert runtime.resolve_policy("auto") is runtime.CPU
    assert runtime.resolve_policy("accelerator") is runtime.ACCELERATOR
    assert (runtime.CPU.attention, runtime.ACCELERATOR.attention) == ("blocked", "dense")
    with pytest.raises(ValueError, match="unknown execution policy 'gpu'"):
        runtime.resolve_policy("gpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        runtime.execution_config(TINY, "cpu", "float16")


def test_the_default_attention_is_dense_and_the_policies_set_their_own(cpu_model, accelerator_model):
    assert TINY.attention == "dense"
    assert cpu_model.config.attention == "blocked" and accelerator_model.config.attention == "dense"
    assert dataclasses.replace(cpu_model.config, attention="dense") == TINY


def test_dense_and_blocked_models_give_the_same_outputs_and_gradients(variables, monkeypatch):
    """The blocked implementation with tiny blocks, so that the tiny model's 20 encoder tokens and
    12 decoder queries really loop over blocks of queries (3 blocks of 7, 2 of 6); a batch of an
    unpadded and a padded image (the attention cores alone: tests/test_transformer.py)."""
    from detr_jax.models import transformer

    monkeypatch.setattr(transformer, "BLOCKED_ABOVE", 4)
    monkeypatch.setitem(transformer.ATTENTION_IMPLEMENTATIONS, "blocked",
                        functools.partial(transformer.blocked_attention, query_chunk=8))
    x, mask = random_images([(128, 160), (100, 130)], (128, 160), seed=1)

    def run(attention):
        module = DETR(dataclasses.replace(TINY, attention=attention))

        def loss(p):
            out = module.apply(dict(variables, params=p), x, mask)
            return jnp.sum(out["pred_logits"] ** 2) + jnp.sum(jnp.sin(out["pred_masks"])), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (dense_loss, dense_out), dense_grads = run("dense")
    (blocked_loss, blocked_out), blocked_grads = run("blocked")
    assert_trees_close(dense_out, blocked_out, atol=1e-4)
    np.testing.assert_allclose(dense_loss, blocked_loss, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(dense_grads))
    assert_trees_close(dense_grads, blocked_grads, atol=1e-4 * scale)


def test_the_accelerator_policy_runs_a_batch_as_one_program_without_loops(accelerator_model):
    """No `while` in the HLO: no loop over heads, query blocks or images, and the panoptic
    model's masks in the same program."""
    x, mask = random_images([(64, 80), (50, 70), (64, 96), (40, 96)], (64, 96))
    lowered = accelerator_model.lower(x, mask)
    assert isinstance(lowered, jax.stages.Lowered)
    hlo = lowered.as_text()
    assert "while" not in hlo
    assert lowered.compile().cost_analysis() is not None
    out = accelerator_model(x, mask)
    assert out["pred_masks"].shape == (4, TINY.num_queries, 16, 24)


def test_the_cpu_policy_loops_over_images_and_query_blocks(cpu_model):
    x, mask = random_images([(64, 80), (50, 70)], (64, 96))
    assert "while" in cpu_model.lower(x, mask).as_text()


def test_both_policies_give_the_same_outputs(cpu_model, accelerator_model):
    x, mask = random_images([(64, 80), (50, 70), (64, 96)], (64, 96), seed=2)
    assert_trees_close(cpu_model(x, mask), accelerator_model(x, mask), atol=1e-4)


def test_masks_of_chosen_queries_equal_every_querys_masks_there(variables):
    x, mask = random_images([(64, 80), (50, 70)], (64, 96), seed=4)
    module = DETR(TINY)

    def every_and_chosen(variables, x, mask, chosen):
        out, features = module.apply(variables, x, mask, method=DETR.detect)
        return (module.apply(variables, x, mask), out, features,
                module.apply(variables, features, chosen, method=DETR.masks_of_queries))

    chosen = np.array([[7, 0, 3], [11, 11, 2]], np.int32)
    every, out, features, masks = jax.jit(every_and_chosen)(variables, x, mask, chosen)
    assert "pred_masks" not in out and features.queries.shape == (2, TINY.num_queries, TINY.hidden_dim)
    np.testing.assert_allclose(masks, np.take_along_axis(np.asarray(every["pred_masks"]), chosen[..., None, None], 1),
                               rtol=0, atol=1e-5)
    for key in ("pred_logits", "pred_boxes"):
        np.testing.assert_array_equal(out[key], every[key])


def test_the_output_schema_does_not_depend_on_arguments(variables):
    x, mask = random_images([(64, 96)], (64, 96))
    module = DETR(TINY)
    keys = {tuple(sorted(jax.eval_shape(functools.partial(module.apply, padding_invariant=p), variables, x, mask)))
            for p in (True, False)}
    train = functools.partial(module.apply, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    keys |= {tuple(sorted(jax.eval_shape(train, variables, x, mask)))}
    assert keys == {("aux_outputs", "pred_boxes", "pred_logits", "pred_masks")}


def test_the_query_score_is_the_postprocessors_and_top_queries_use_it():
    from detr_jax.postprocess import box_predictions

    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 11)) * 3
    scores = runtime.query_scores(logits)
    boxes = jnp.full((2, 12, 4), 0.5)
    np.testing.assert_array_equal(scores, box_predictions(logits, boxes, jnp.ones((2, 2)))["scores"])
    indices, cutoff = runtime.top_queries(logits, k=4)
    for b in range(2):
        order = np.argsort(-np.asarray(scores[b]), kind="stable")
        assert set(np.asarray(indices[b])) == set(order[:4])
        assert float(cutoff[b]) == float(scores[b, order[4]])
    over = runtime.queries_over_threshold(np.asarray(logits), 0.5)
    assert over.shape[1] % runtime.MASK_QUERY_MULTIPLE == 0 or over.shape[1] == 12


def test_the_k_best_queries_fall_back_to_every_query_when_a_skipped_one_can_pass(cpu_model):
    x, mask = random_images([(64, 80)], (64, 96), seed=6)
    top = cpu_model(x, mask, mask_queries=2)
    assert top["mask_query_indices"].shape == (1, 2) and "mask_score_cutoff" in top
    exact = cpu_model(x, mask, mask_queries=2, mask_threshold=float(top["mask_score_cutoff"][0]) - 0.01)
    assert "mask_query_indices" not in exact                 # a skipped query passes: every query's mask
    assert (np.asarray(exact["pred_masks"]) > runtime.MASK_FILL).all()
    with pytest.raises(ValueError, match="positive int"):
        cpu_model(x, mask, mask_queries=0)


def test_bfloat16_inference_is_close_to_float32(tiny_checkpoint):
    import detr_jax

    f32 = detr_jax.load(tiny_checkpoint)
    bf16 = detr_jax.load(tiny_checkpoint, dtype="bfloat16", policy="accelerator")
    assert bf16.config.dtype == "bfloat16" and bf16.policy.name == "accelerator"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bf16.variables))
    x, mask = random_images([(64, 80), (50, 70)], (64, 96), seed=7)
    a, b = f32(x, mask), bf16(x, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert b[key].dtype == jnp.float32
    assert np.abs(np.asarray(a["pred_boxes"]) - np.asarray(b["pred_boxes"])).max() < 0.05
    logit_scale = np.abs(np.asarray(a["pred_logits"])).max()
    assert np.abs(np.asarray(a["pred_logits"]) - np.asarray(b["pred_logits"])).max() < 0.05 * logit_scale
    assert "bf16" in bf16.lower(x, mask).as_text()


def test_abstract_variables_allocate_nothing_and_match_the_initialized_tree(variables):
    abstract = abstract_variables(TINY)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(abstract))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
    assert [x.shape for x in jax.tree_util.tree_leaves(abstract)] == [x.shape for x in jax.tree_util.tree_leaves(variables)]


def test_checkpoint_io_does_not_import_the_converter_or_the_runtime():
    code = ("import sys, detr_jax.checkpoint; "
            "print(sorted(m for m in ('detr_jax.convert', 'detr_jax.runtime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


HOST_HEAP_PROBE = """
import ctypes, resource, sys
from detr_jax import runtime

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def page_faults_of_five_allocations(size=40 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = page_faults_of_five_allocations()
if not runtime.keep_host_heap():
    sys.exit(3)
page_faults_of_five_allocations()              # the first allocation takes the pages
print(default, page_faults_of_five_allocations())
"""


def test_a_kept_host_heap_reuses_the_pages_of_freed_buffers():
    """After `keep_host_heap`, a 40 MB block (above glibc's largest automatic mmap threshold,
    32 MB, so mapped and faulted in anew at every allocation by default) freed and allocated again
    takes (almost) no new pages from the kernel.  In a fresh process: the setting is for life."""
    probe = subprocess.run([sys.executable, "-c", HOST_HEAP_PROBE], capture_output=True, text=True)
    if probe.returncode == 3:
        pytest.skip("the C library is not glibc")
    assert probe.returncode == 0, probe.stderr
    default_faults, kept_faults = map(int, probe.stdout.split())
    assert default_faults >= 5                      # at least one page per fresh mapping
    assert kept_faults * 10 <= default_faults
