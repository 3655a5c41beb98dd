"""ONNX export through jax2onnx, from JAX primitives.

The serving function is first traced to a jaxpr (the model's own arithmetic, untouched); the
function handed to `jax2onnx.to_onnx` replays that jaxpr primitive by primitive.  Two reasons:
- jax2onnx substitutes its own lowerings for some Flax and jax.numpy calls made while it traces
  (`nn.max_pool`, `nn.Conv`, `jnp.einsum`, ...); replaying primitives keeps exactly the
  operations JAX runs, whatever the model calls;
- where a primitive's ONNX lowering is wrong or does not run in onnxruntime, `REWRITES` gives it
  an equivalent formulation with the same numbers, in this file only (the model keeps its one
  code path).

Rewrites (each checked against JAX and onnxruntime in tests/test_export_onnx.py):
- `reduce_window_max` (the ResNet stem's 3x3/2 max-pool, NHWC): jax2onnx lowers a window over
  all four axes to a MaxPool with four spatial axes, which onnxruntime refuses ("Unsupported
  pooling size"); the rewrite pads with -inf and takes the maximum of the window's strided slices.
- integer `div` (the valid sizes' stride arithmetic `(n + 1) // 2`): jax2onnx turns `(a + b) / 2`
  into ONNX `Mean`, which has no integer version; the rewrite divides `a + b - rem(a + b, 2)`.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore


def _max_pool_as_slices(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """`lax.reduce_window_max` as the maximum of strided slices of the -inf padded input (exact)."""
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        raise NotImplementedError("reduce_window_max with dilation has no ONNX rewrite")
    neg_inf = jnp.array(-jnp.inf, x.dtype)
    x = jax.lax.pad(x, neg_inf, [(lo, hi, 0) for lo, hi in padding])
    out_shape = [(n - k) // s + 1 for n, k, s in zip(x.shape, window_dimensions, window_strides)]
    out = None
    for offset in np.ndindex(*window_dimensions):
        limit = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out_shape, window_strides)]
        part = jax.lax.slice(x, offset, limit, window_strides)
        out = part if out is None else jnp.maximum(out, part)
    return out


def _integer_div_exactly(x, y):
    """Integer `lax.div` (truncating) as `(x - rem(x, y)) / y`, a division without remainder.

    jax2onnx lowers `(a + b) / 2` to ONNX `Mean(a, b)`, also for integers, where Mean is not
    defined (and would not truncate): the stride arithmetic `(n + 1) // 2` of the valid sizes
    hits it.  The dividend here is not an addition, and the division is exact.
    """
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        return jax.lax.div(x, y)
    return jax.lax.div(jax.lax.sub(x, jax.lax.rem(x, y)), y)


REWRITES: Dict[str, Callable[..., Any]] = {
    "reduce_window_max": _max_pool_as_slices,
    "div": _integer_div_exactly,
}

_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}


def replay(closed: "jcore.ClosedJaxpr", *args):
    """Evaluate `closed` on `args` primitive by primitive, applying `REWRITES`; calls (jit,
    custom_jvp, ...) are inlined, so their bodies are rewritten too."""
    return _eval(closed.jaxpr, closed.consts, args)


def _eval(jaxpr, consts, args):
    env: Dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in REWRITES:
            outvals = REWRITES[name](*invals, **eqn.params)
        elif name in _CALLS and _CALLS[name] in eqn.params:
            inner = eqn.params[_CALLS[name]]
            if isinstance(inner, jcore.ClosedJaxpr):
                outvals = _eval(inner.jaxpr, inner.consts, invals)
            else:
                outvals = _eval(inner, (), invals)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.params)
        if not eqn.primitive.multiple_results and name not in _CALLS:
            outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def to_onnx_model(fn: Callable, example_args: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
                  output_names: Sequence[str], model_name: str = "detr"):
    """`fn(*example_args)` as an `onnx.ModelProto` (fixed shapes), replayed through `replay`."""
    from jax2onnx import to_onnx

    closed = jax.make_jaxpr(fn)(*example_args)
    return to_onnx(lambda *xs: tuple(replay(closed, *xs)), list(example_args), model_name=model_name,
                   input_names=list(input_names), output_names=list(output_names))


def save_onnx(model, path: pathlib.Path) -> pathlib.Path:
    """Write `model` to `path` (weights inside the file up to protobuf's 2 GB limit)."""
    import onnx

    onnx.save(model, str(path))
    return path
