"""Model checkpoints: an orbax checkpoint of the Flax variables with the model config beside it.

Layout of a checkpoint folder:
    config.json      {"model": ModelConfig fields, "format": 1, "source": ...}
    variables/       orbax StandardCheckpointer tree {'params': ..., 'buffers': ...}

`load(path)` returns a ready `DETRModel`; training checkpoints (orbax CheckpointManager steps)
export the same layout for inference.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import xla_cpu
from detr_jax.config import ModelConfig

FORMAT_VERSION = 1


def save(path, config: ModelConfig, variables: Dict[str, Any], source: Optional[str] = None) -> pathlib.Path:
    """Write `variables` (numpy or jax arrays) and `config` to the folder `path` (replaced if present)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "model": config.to_dict(), "source": source}
    # collections without arrays (the `buffers` of a model without frozen BatchNorm, as training
    # exports them) are left out: the restore tree (`expected_shapes`) has none
    variables = {name: jax.tree_util.tree_map(np.asarray, tree) for name, tree in variables.items()
                 if jax.tree_util.tree_leaves(tree)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "variables", variables, force=True)
    (path / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def read_config(path) -> ModelConfig:
    meta_file = pathlib.Path(path) / "config.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a detr-jax checkpoint (no config.json); convert PyTorch "
                                f"weights with `python convert_weights.py SRC OUT`")
    return ModelConfig.from_dict(json.loads(meta_file.read_text())["model"])


def load_variables(path, config: ModelConfig) -> Dict[str, Any]:
    import orbax.checkpoint as ocp

    from detr_jax.convert import expected_shapes  # the model's tree, without allocating it
    from flax.traverse_util import unflatten_dict

    abstract = unflatten_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in expected_shapes(config).items()})
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(path).absolute() / "variables", abstract)


MASK_QUERY_MULTIPLE = 8   # `mask_threshold`: the mask head runs on a multiple of this many queries
SCORE_MARGIN = 1e-4       # queries this far below the threshold are kept too (float rounding)


def queries_over_threshold(logits: np.ndarray, threshold: float) -> np.ndarray:
    """int32 [B, K]: the K best queries by the post-processors' score (`postprocess.class_scores`
    of `logits` [B, Q, C+1]: the best real-class probability), K = the most that pass `threshold`
    in one image rounded up to a multiple of `MASK_QUERY_MULTIPLE` (at most Q)."""
    from detr_jax.postprocess import class_scores

    scores = np.asarray(class_scores(jnp.asarray(logits))[0])
    passing = int((scores > threshold - SCORE_MARGIN).sum(axis=-1).max())
    k = min(logits.shape[1], max(1, -(-passing // MASK_QUERY_MULTIPLE)) * MASK_QUERY_MULTIPLE)
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(np.int32)


def _masks_of_queries(config: ModelConfig, params, mask_inputs, indices):
    """[B, Q, H/4, W/4] mask logits: those of `indices` int [B, K], `MASK_FILL` for the others;
    `indices=None`: every query's, in order.  One image after the other (`lax.map`) for B > 1."""
    from detr_jax.models.detr import fill_skipped_masks, mask_logits

    def one_image(inputs, image_indices):
        if image_indices is None:
            every = jnp.broadcast_to(jnp.arange(config.num_queries, dtype=jnp.int32), inputs["queries"].shape[:2])
            return mask_logits(config, params, inputs, every)
        return fill_skipped_masks(mask_logits(config, params, inputs, image_indices), image_indices,
                                  config.num_queries)

    return _one_image_at_a_time(one_image, mask_inputs, indices)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, "malloc_trim", None)     # glibc only (not musl)


def release_host_memory() -> None:
    """Give the free pages of the C heap back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    XLA frees its compiler's working memory when a compilation ends, but glibc keeps those pages:
    after compiling R50 at 800x1066 the process stays ~170 MB larger (RSS) until they are trimmed.
    `DETRModel` calls this after every call that compiled a new program.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _call_releasing_compiler_memory(fn, *args, **kwargs):
    """fn(*args, **kwargs) for a jitted fn, then `release_host_memory` if that call compiled."""
    compiled = fn._cache_size() if hasattr(fn, "_cache_size") else None
    out = fn(*args, **kwargs)
    if compiled is not None and fn._cache_size() != compiled:
        release_host_memory()
    return out


def _one_image_at_a_time(fn, *batched):
    """`fn(*batched)` for pytrees of arrays that lead with the batch axis, run one image at a time
    inside one program (`lax.map`), outputs stacked as the batch's; a batch of one runs directly."""
    if jax.tree_util.tree_leaves(batched)[0].shape[0] == 1:
        return fn(*batched)
    out = jax.lax.map(lambda one: fn(*jax.tree_util.tree_map(lambda t: t[None], one)), batched)
    return jax.tree_util.tree_map(lambda t: t.reshape(t.shape[0], *t.shape[2:]), out)


def _image_by_image(apply, variables, pixel_values, pixel_mask, **kwargs):
    """`apply(variables, pixel_values, pixel_mask, **kwargs)` one image at a time inside one program
    (`_one_image_at_a_time`).  The same outputs: DETR's images never interact (frozen batch norm,
    attention within an image), in either padding semantics.  The activations of one image are
    live instead of the batch's (R50 at 800x1066: five [200x267, 256] layer1 maps, 55 MB each per
    image)."""
    return _one_image_at_a_time(lambda x, mask: apply(variables, x, mask, **kwargs), pixel_values, pixel_mask)


class DETRModel:
    """A converted or trained DETR ready to run: `.config`, `.variables`, `__call__`.

    `model(pixel_values, pixel_mask)`: pixel_values float32 [B, H, W, 3] normalized with the
    ImageNet mean/std; pixel_mask bool [B, H, W], True on real pixels, False on padding (the
    original DETR's mask is True on padding).  Returns the dict described in
    `detr_jax.models.detr`.  The jitted function is compiled once per input shape and reused;
    the compiler's freed memory is given back to the OS after each compilation.  A batch runs one
    image after the other inside that program (same outputs, a single image's activations live).
    On the CPU the programs get `detr_jax.xla_cpu`'s compiler options (measured per program).
    """

    def __init__(self, config: ModelConfig, variables: Dict[str, Any]):
        from detr_jax.models import DETR
        from detr_jax.models.detr import select_mask_queries

        self.config = config
        self.variables = variables
        self.module = DETR(config)
        self._apply = xla_cpu.jit(functools.partial(_image_by_image, self.module.apply), xla_cpu.MODEL,
                                  static_argnames=("train", "padding_invariant", "mask_queries"))
        self._apply_capture = xla_cpu.jit(functools.partial(self.module.apply, mutable=["intermediates"]),
                                          xla_cpu.MODEL, static_argnames=("train", "padding_invariant"))
        self._masks_of = xla_cpu.jit(functools.partial(_masks_of_queries, config), xla_cpu.MASK_HEAD)
        self._select_queries = jax.jit(select_mask_queries, static_argnames=("k",))

    def __call__(self, pixel_values, pixel_mask, *, padding_invariant: bool = True,
                 mask_queries: Optional[int] = None, mask_threshold: Optional[float] = None) -> Dict[str, Any]:
        """`mask_queries=K` runs the mask head on the K best queries only (see detr_jax.models.detr).

        `mask_threshold=t` (panoptic models): the mask head runs only on the queries whose best
        real-class probability exceeds `t` in some image of the batch, their count rounded up to a
        multiple of `MASK_QUERY_MULTIPLE` (one compile per count); the other queries' masks are
        `MASK_FILL`.  Exact for every post-processor that keeps queries by a score above `t`.

        A panoptic model runs as two programs, whichever queries get masks: the model with the
        per-image part of the mask head (`mask_queries=0`), then the per-query part of the mask
        head on the chosen queries (its own XLA:CPU options, `detr_jax.xla_cpu.MASK_HEAD`).  So a
        query's mask is computed by the same program whether all, the K best or the queries over a
        threshold get masks.  `mask_queries=0` returns the first program's outputs (`mask_inputs`).
        """
        pixel_values, pixel_mask = jnp.asarray(pixel_values), jnp.asarray(pixel_mask, bool)
        run = _call_releasing_compiler_memory
        if not self.config.masks or (mask_queries == 0 and mask_threshold is None):
            return run(self._apply, self.variables, pixel_values, pixel_mask,
                       padding_invariant=padding_invariant, mask_queries=mask_queries)
        out = dict(run(self._apply, self.variables, pixel_values, pixel_mask, padding_invariant=padding_invariant,
                       mask_queries=0))
        inputs = out.pop("mask_inputs")
        indices = None
        if mask_threshold is not None:
            indices = queries_over_threshold(np.asarray(out["pred_logits"]), mask_threshold)
        elif mask_queries is not None and mask_queries < self.config.num_queries:
            indices, out["mask_score_cutoff"] = self._select_queries(out["pred_logits"], k=mask_queries)
        out["pred_masks"] = run(self._masks_of, self.variables["params"], inputs,
                                None if indices is None else jnp.asarray(indices))
        if indices is not None:
            out["mask_query_indices"] = indices
        return out

    def with_intermediates(self, pixel_values, pixel_mask, *, padding_invariant: bool = True):
        """(outputs, intermediates): backbone_layer1..4, feature_mask, position_embedding, projected, memory, decoder_hs, attention_maps."""
        out, state = self._apply_capture(self.variables, jnp.asarray(pixel_values), jnp.asarray(pixel_mask, bool),
                                         padding_invariant=padding_invariant)
        return out, {k: v[0] for k, v in state["intermediates"].items()}

    def __repr__(self) -> str:
        c = self.config
        return (f"DETRModel({c.backbone}{'-DC5' if c.dilation else ''}, {'panoptic' if c.masks else 'detection'}, "
                f"{c.num_classes} classes, {c.num_queries} queries)")


def load(path) -> DETRModel:
    """Load a checkpoint folder written by `save` (e.g. by `convert_weights.py`)."""
    config = read_config(path)
    return DETRModel(config, load_variables(path, config))
