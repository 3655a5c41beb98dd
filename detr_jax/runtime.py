"""The inference runtime: how a DETR runs on this machine, chosen per backend in one place.

    import detr_jax
    model = detr_jax.load("checkpoints/r50_dc5_panoptic")                 # policy="auto"
    model = detr_jax.load("checkpoints/r50_dc5_panoptic", dtype="bfloat16", policy="accelerator")
    out = model(pixel_values, pixel_mask)      # [B, H, W, 3] normalized; mask True on real pixels
    print(model.lower(pixel_values, pixel_mask).as_text())    # the program it runs (HLO)

An `ExecutionPolicy` says how the programs are built; the model's arithmetic is the same under
every policy (`tests/test_runtime.py`):
  "cpu": the encoder's attention in blocks of one head's queries (`ModelConfig.attention =
    "blocked"`), a batch one image after the other inside one program (`lax.map`: one image's
    activations live), `detr_jax.xla_cpu`'s compiler options per program, the C heap trimmed
    after each compilation (`release_host_memory`), and in the train loop a C heap that keeps the
    pages it frees (`keep_host_heap`).  Measured on 2-core CPUs (BENCHMARKS.md).
  "accelerator" (GPU, TPU): dense attention over the whole batch and all heads, the whole batch
    vectorized in one program, XLA's defaults.
  "auto" picks by `jax.default_backend()`, so the accelerator policy can also run (and be tested)
  on a CPU.  The train step follows the same policy (`detr_jax.train`).

The mask-query policy (a panoptic model's mask head is most of its FLOPs; post-processing keeps
only queries whose score passes a threshold): `query_scores` is the one definition of a query's
score (the post-processors' best real-class probability); `__call__`'s `mask_queries` /
`mask_threshold` pick the queries whose masks are computed, the others get `MASK_FILL`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import checkpoint, xla_cpu
from detr_jax.config import ModelConfig
from detr_jax.models import DETR
from detr_jax.postprocess import class_scores

MASK_FILL = -1e4           # mask logit of the queries whose masks were not computed (sigmoid = 0)
MASK_QUERY_MULTIPLE = 8    # threshold mode: the mask head runs on a multiple of this many queries
SCORE_MARGIN = 1e-4        # threshold mode: queries this far below the threshold get masks too (rounding)
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------------------------------------
# Execution policies
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How the runtime (and the train step) builds DETR's programs on one kind of backend."""

    name: str
    attention: str              # `ModelConfig.attention` of the programs: "blocked" or "dense"
    image_by_image: bool        # a batch runs one image after the other inside one program
    xla_cpu_options: bool       # `detr_jax.xla_cpu`'s compiler options per program
    trim_host_memory: bool      # `release_host_memory` after a call that compiled
    separate_mask_program: bool  # a panoptic model's per-query mask head is always a program of its own
    keep_host_heap: bool        # the train loop calls `keep_host_heap` (its step's buffers live on the host)


CPU = ExecutionPolicy("cpu", attention="blocked", image_by_image=True, xla_cpu_options=True, trim_host_memory=True,
                      separate_mask_program=True, keep_host_heap=True)
ACCELERATOR = ExecutionPolicy("accelerator", attention="dense", image_by_image=False, xla_cpu_options=False,
                              trim_host_memory=False, separate_mask_program=False, keep_host_heap=False)
POLICIES = {"cpu": CPU, "accelerator": ACCELERATOR}
PolicyLike = Union[str, ExecutionPolicy]


def resolve_policy(policy: PolicyLike = "auto") -> ExecutionPolicy:
    """"auto" (by `jax.default_backend()`: the CPU policy on the CPU, else the accelerator's),
    "cpu", "accelerator", or an `ExecutionPolicy` itself."""
    if isinstance(policy, ExecutionPolicy):
        return policy
    if policy == "auto":
        return CPU if jax.default_backend() == "cpu" else ACCELERATOR
    if policy not in POLICIES:
        raise ValueError(f"unknown execution policy {policy!r}; known: auto, {', '.join(POLICIES)}")
    return POLICIES[policy]


def execution_config(config: ModelConfig, policy: PolicyLike = "auto", dtype: Optional[str] = None) -> ModelConfig:
    """`config` with the policy's attention implementation and, when given, the compute `dtype`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return dataclasses.replace(config, attention=resolve_policy(policy).attention, dtype=dtype or config.dtype)


# ------------------------------------------------------------------------------------------------
# The mask-query policy
# ------------------------------------------------------------------------------------------------
def query_scores(logits: jnp.ndarray) -> jnp.ndarray:
    """[B, Q, C+1] -> [B, Q]: a query's score, its best real-class probability (the score every
    post-processor keeps queries by)."""
    return class_scores(logits)[0]


@functools.partial(jax.jit, static_argnames=("k",))
def top_queries(logits: jnp.ndarray, k: int):
    """(indices int32 [B, k] of the k best queries by `query_scores`, the best score left out [B]):
    a query passes a threshold t only if it is selected or the cutoff exceeds t.  k < Q."""
    top, indices = jax.lax.top_k(query_scores(logits), k + 1)
    return indices[:, :k].astype(jnp.int32), top[:, k]


def queries_over_threshold(logits: np.ndarray, threshold: float) -> np.ndarray:
    """int32 [B, K]: the K best queries by `query_scores`, K = the most that pass `threshold` (less
    `SCORE_MARGIN`) in one image, rounded up to a multiple of `MASK_QUERY_MULTIPLE` (at most Q)."""
    scores = np.asarray(query_scores(jnp.asarray(logits)))
    passing = int((scores > threshold - SCORE_MARGIN).sum(axis=-1).max())
    k = min(logits.shape[1], max(1, -(-passing // MASK_QUERY_MULTIPLE)) * MASK_QUERY_MULTIPLE)
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(np.int32)


def fill_skipped_masks(masks: jnp.ndarray, indices: jnp.ndarray, num_queries: int) -> jnp.ndarray:
    """Masks [B, K, h, w] of the queries `indices` [B, K] -> [B, num_queries, h, w], `MASK_FILL`
    for the queries not in `indices`."""
    b = masks.shape[0]
    full = jnp.full((b, num_queries, *masks.shape[2:]), MASK_FILL, jnp.float32)
    return full.at[jnp.arange(b)[:, None], indices].set(masks)


# ------------------------------------------------------------------------------------------------
# Host memory and the per-image loop (the CPU policy)
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _glibc_function(name: str):
    """A function of the C library when it is glibc's (Linux), else None."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, name, None)     # glibc only (not musl)


# glibc's mallopt parameters (malloc.h) and the values `keep_host_heap` sets.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HOST_HEAP = {M_MMAP_THRESHOLD: 64 << 20, M_TRIM_THRESHOLD: 512 << 20, M_TOP_PAD: 64 << 20}


def release_host_memory() -> None:
    """Give the free pages of the C heap back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    XLA frees its compiler's working memory when a compilation ends, but glibc keeps those pages
    (after compiling R50 at 800x1066 the process stays ~170 MB larger until they are trimmed).
    """
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def keep_host_heap() -> bool:
    """Make glibc's malloc keep the memory a loop frees, for the rest of the process; False where
    the C library is not glibc (nothing changed).

    A train step on the CPU allocates and frees the same buffers every step (XLA's temporaries,
    the loader's batches), many above glibc's mmap threshold or its trim threshold: by default
    each step maps them anew and the kernel zero-fills every page again (the demo, 2026-12-05:
    ~14,000 page faults a step, 110 s of system time against 925 s of user time).  Here blocks
    up to 64 MiB come from the heap, which keeps up to 512 MiB of free memory instead of giving
    it back (`HOST_HEAP`); the demo then spent 20 s in the system, and peaked at 2.3 GB instead
    of 1.85.  `release_host_memory` still trims on request.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in HOST_HEAP.items())


def one_image_at_a_time(fn: Callable, *batched):
    """`fn(*batched)` for pytrees of arrays that lead with the batch axis, run one image at a time
    inside one program (`lax.map`), outputs stacked as the batch's; a batch of one runs directly.
    The same outputs, since DETR's images never interact (frozen batch norm, attention within an
    image), in either padding semantics; one image's activations are live instead of the batch's."""
    if jax.tree_util.tree_leaves(batched)[0].shape[0] == 1:
        return fn(*batched)
    out = jax.lax.map(lambda one: fn(*jax.tree_util.tree_map(lambda t: t[None], one)), batched)
    return jax.tree_util.tree_map(lambda t: t.reshape(t.shape[0], *t.shape[2:]), out)


def whole_batch(fn: Callable, *batched):
    """`fn(*batched)`: the batch vectorized in one program (the accelerator policy)."""
    return fn(*batched)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class DETRModel:
    """A converted or trained DETR ready to run: `.config`, `.variables`, `.policy`, `__call__`.

    `model(pixel_values, pixel_mask)`: pixel_values float32 [B, H, W, 3] normalized with the
    ImageNet mean/std; pixel_mask bool [B, H, W], True on real pixels, False on padding (the
    original DETR's mask is True on padding).  Returns the outputs of `detr_jax.models.detr`
    (float32 whatever the compute dtype), plus `mask_query_indices` when the mask head ran on
    chosen queries only.  Each program is compiled once per input shape and reused.

    `config` is the execution config: the checkpoint's with the policy's attention implementation
    and the compute dtype (`execution_config`); `variables` stay float32.
    """

    def __init__(self, config: ModelConfig, variables: Dict[str, Any], *, policy: PolicyLike = "auto",
                 dtype: Optional[str] = None):
        self.policy = resolve_policy(policy)
        self.config = execution_config(config, self.policy, dtype)
        self.variables = variables
        self.module = DETR(self.config)
        per_batch = one_image_at_a_time if self.policy.image_by_image else whole_batch
        self._forward = self._jit(functools.partial(_forward, self.module, per_batch), xla_cpu.MODEL)
        self._detect = self._jit(functools.partial(_detect, self.module, per_batch), xla_cpu.MODEL)
        self._masks = self._jit(functools.partial(_masks_of_queries, self.module, per_batch), xla_cpu.MASK_HEAD,
                                static=())
        self._capture = self._jit(functools.partial(self.module.apply, mutable=["intermediates"]), xla_cpu.MODEL)

    def _jit(self, fn: Callable, library_fusions, static=("padding_invariant",)):
        if self.policy.xla_cpu_options:
            return xla_cpu.jit(fn, library_fusions, static_argnames=static)
        return jax.jit(fn, static_argnames=static)

    def _run(self, program, *args, **kwargs):
        """program(*args, **kwargs), then `release_host_memory` if the policy says so and it compiled."""
        if not self.policy.trim_host_memory:
            return program(*args, **kwargs)
        compiled = program._cache_size()
        out = program(*args, **kwargs)
        if program._cache_size() != compiled:
            release_host_memory()
        return out

    def _single_program(self, mask_queries, mask_threshold) -> bool:
        """Whether the outputs come from one program of `DETR.__call__` (else: `detect`, then the
        per-query mask head on the chosen queries)."""
        choose = mask_queries is not None or mask_threshold is not None
        return not self.config.masks or (not choose and not self.policy.separate_mask_program)

    def __call__(self, pixel_values, pixel_mask, *, padding_invariant: bool = True,
                 mask_queries: Optional[int] = None, mask_threshold: Optional[float] = None) -> Dict[str, Any]:
        """The model's outputs; for panoptic models, the masks of the chosen queries:

          neither argument: every query's mask;
          `mask_threshold=t`: the queries whose score (`query_scores`) passes t in some image of
            the batch, their count rounded up to a multiple of `MASK_QUERY_MULTIPLE` (one compile
            per count): exact for every post-processor that keeps queries by a score above t;
          `mask_queries=K`: the K best queries; `mask_score_cutoff` [B] is the best score left
            out.  With `mask_threshold=t` too, every query's mask when a skipped query passes t.
        The other queries' masks are `MASK_FILL`.  Under the CPU policy a panoptic model always runs
        as two programs (the model with the per-image part of the mask head, then the per-query part
        on the chosen queries), so a query's mask does not depend on which queries got masks.
        """
        pixel_values, pixel_mask = jnp.asarray(pixel_values), jnp.asarray(pixel_mask, bool)
        if mask_queries is not None and not (isinstance(mask_queries, int) and mask_queries > 0):
            raise ValueError(f"mask_queries must be a positive int or None, got {mask_queries!r}")
        if self._single_program(mask_queries, mask_threshold):
            return dict(self._run(self._forward, self.variables, pixel_values, pixel_mask,
                                  padding_invariant=padding_invariant))
        out, features = self._run(self._detect, self.variables, pixel_values, pixel_mask,
                                  padding_invariant=padding_invariant)
        out = dict(out)
        indices = None
        if mask_queries is not None and mask_queries < self.config.num_queries:
            indices, cutoff = top_queries(out["pred_logits"], k=mask_queries)
            if mask_threshold is not None and float(jnp.max(cutoff)) > mask_threshold - SCORE_MARGIN:
                indices = None     # a query left out may pass: every query's mask
            else:
                out["mask_score_cutoff"] = cutoff
        elif mask_queries is None and mask_threshold is not None:
            indices = jnp.asarray(queries_over_threshold(np.asarray(out["pred_logits"]), mask_threshold))
        out["pred_masks"] = self._run(self._masks, self.variables, features, indices)
        if indices is not None:
            out["mask_query_indices"] = indices
        return out

    def lower(self, pixel_values, pixel_mask, *, padding_invariant: bool = True) -> jax.stages.Lowered:
        """The `jax.stages.Lowered` of the first (for all but the CPU policy's panoptic models, the
        only) program that `model(pixel_values, pixel_mask)` runs: `.as_text()` is its StableHLO,
        `.compile().cost_analysis()` its FLOPs and bytes.  Under the CPU policy a panoptic model's
        first program is `DETR.detect` (the mask head's per-query part is a second program)."""
        program = self._forward if self._single_program(None, None) else self._detect
        return program.lower(self.variables, jnp.asarray(pixel_values), jnp.asarray(pixel_mask, bool),
                             padding_invariant=padding_invariant)

    def with_intermediates(self, pixel_values, pixel_mask, *, padding_invariant: bool = True):
        """(outputs, intermediates): backbone_layer1..4, feature_mask, position_embedding, projected,
        memory, decoder_hs and (panoptic) attention_maps, for the whole batch in one program."""
        out, state = self._capture(self.variables, jnp.asarray(pixel_values), jnp.asarray(pixel_mask, bool),
                                   padding_invariant=padding_invariant)
        return out, {k: v[0] for k, v in state["intermediates"].items()}

    def __repr__(self) -> str:
        c = self.config
        return (f"DETRModel({c.backbone}{'-DC5' if c.dilation else ''}, {'panoptic' if c.masks else 'detection'}, "
                f"{c.num_classes} classes, {c.num_queries} queries, {c.dtype}, policy {self.policy.name})")


def _forward(module: DETR, per_batch: Callable, variables, pixel_values, pixel_mask, *, padding_invariant: bool):
    return per_batch(lambda x, m: module.apply(variables, x, m, padding_invariant=padding_invariant),
                     pixel_values, pixel_mask)


def _detect(module: DETR, per_batch: Callable, variables, pixel_values, pixel_mask, *, padding_invariant: bool):
    return per_batch(lambda x, m: module.apply(variables, x, m, padding_invariant=padding_invariant,
                                               method=DETR.detect), pixel_values, pixel_mask)


def _masks_of_queries(module: DETR, per_batch: Callable, variables, features, indices):
    """[B, Q, H/4, W/4] mask logits: those of `indices` int [B, K], `MASK_FILL` for the others;
    `indices=None`: every query's, in order."""
    num_queries = module.config.num_queries

    def masks(features, indices):
        if indices is None:
            every = jnp.broadcast_to(jnp.arange(num_queries, dtype=jnp.int32), features.queries.shape[:2])
            return module.apply(variables, features, every, method=DETR.masks_of_queries)
        chosen = module.apply(variables, features, indices, method=DETR.masks_of_queries)
        return fill_skipped_masks(chosen, indices, num_queries)

    return per_batch(masks, features, indices)


def load(path, *, policy: PolicyLike = "auto", dtype: Optional[str] = None) -> DETRModel:
    """A checkpoint folder written by `detr_jax.checkpoint.save` (e.g. by `convert_weights.py` or
    training) as a `DETRModel` run under `policy` ("auto", "cpu", "accelerator") in `dtype`
    ("float32", "bfloat16"; default: the checkpoint's)."""
    config = checkpoint.read_config(path)
    return DETRModel(config, checkpoint.load_variables(path, config), policy=policy, dtype=dtype)
