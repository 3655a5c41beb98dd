"""ONNX export through jax2onnx, from JAX primitives.

The serving function is first traced to a jaxpr (the model's own arithmetic, untouched) and
flattened into a `Program` of primitives; the functions handed to `jax2onnx.to_onnx` replay it
primitive by primitive, in pieces joined afterwards (`to_onnx_model`).  Two reasons:
- jax2onnx substitutes its own lowerings for some Flax and jax.numpy calls made while it traces
  (`nn.max_pool`, `nn.Conv`, `jnp.einsum`, ...); replaying primitives keeps exactly the
  operations JAX runs, whatever the model calls;
- where a primitive's ONNX lowering is wrong or does not run in onnxruntime, `REWRITES` gives it
  an equivalent formulation with the same numbers, in this file only (the model keeps its one
  code path).

Rewrites (each checked against JAX and onnxruntime in tests/test_export_onnx_ops.py):
- `reduce_window_max` (the ResNet stem's 3x3/2 max-pool, NHWC): jax2onnx lowers a window over
  all four axes to a MaxPool with four spatial axes, which onnxruntime refuses ("Unsupported
  pooling size"); the rewrite pads with -inf and takes the maximum of the window's strided slices.
- integer `div` (the valid sizes' stride arithmetic `(n + 1) // 2`): jax2onnx turns `(a + b) / 2`
  into ONNX `Mean`, which has no integer version; the rewrite divides `a + b - rem(a + b, 2)`.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
FOLD_MAX_ELEMENTS = 1 << 16   # constants are folded unless they grow beyond this and their inputs


@dataclasses.dataclass
class _Step:
    """One primitive application of the flattened program: values are named by int keys."""

    primitive: Any
    params: Dict[str, Any]
    inputs: List[int]
    outputs: List[int]


def _apply(step: _Step, inputs: Sequence[Any]) -> List[Any]:
    """`step` on `inputs`, through its `REWRITES` entry if it has one."""
    rewrite = REWRITES.get(step.primitive.name)
    outs = rewrite(*inputs, **step.params) if rewrite else step.primitive.bind(*inputs, **step.params)
    return list(outs) if step.primitive.multiple_results else [outs]


class Program:
    """A jaxpr flattened to primitives (calls inlined), its constants folded and its dead steps
    dropped, to be replayed with `REWRITES` inside jax2onnx's trace, in segments.

    Folding evaluates, once and eagerly, every step whose inputs are all constants (the frozen
    BatchNorm's scale and shift, iotas, reshaped weights) unless its output outgrows its inputs
    (a broadcast to a feature map's shape stays a broadcast): the same XLA arithmetic as the
    model's program, and a smaller graph.

    `lifted`: constants broadcast to more than `FOLD_MAX_ELEMENTS` values (a bias or the zero of
    a `where` over the mask head's [B * Q, h, w, C] maps).  jax2onnx stores the broadcast of a
    constant as a constant of the broadcast shape (R50-DC5 panoptic, batch 2 at 320x480: 2.2 GB
    of initializers for 172 MB of weights, over protobuf's 2 GB limit); these constants are
    therefore passed to the pieces as inputs, so that the broadcast stays an Expand, and
    `join_graphs` stores them once, as they are.
    """

    def __init__(self, closed: "jcore.ClosedJaxpr") -> None:
        self._keys = itertools.count()
        self.values: Dict[int, Any] = {}
        self.avals: Dict[int, Any] = {}
        self.steps: List[_Step] = []
        consts = [self._constant(c, v.aval) for c, v in zip(closed.consts, closed.jaxpr.constvars)]
        self.inputs = [self._variable(v) for v in closed.jaxpr.invars]
        self.outputs = self._flatten(closed.jaxpr, consts + self.inputs)
        self._fold()
        self._drop_dead()
        self.lifted = {step.inputs[0] for step in self.steps
                       if step.primitive.name == "broadcast_in_dim" and step.inputs[0] in self.values
                       and int(np.prod(step.params["shape"])) > FOLD_MAX_ELEMENTS}

    def _constant(self, value, aval=None) -> int:
        key = next(self._keys)
        self.values[key] = value
        self.avals[key] = aval if aval is not None else jax.typeof(value)
        return key

    def constant(self, key: int) -> np.ndarray:
        """The value of the constant `key` as numpy, in its JAX dtype."""
        return np.asarray(self.values[key], dtype=self.avals[key].dtype)

    def _variable(self, var) -> int:
        key = next(self._keys)
        self.avals[key] = var.aval
        return key

    def _flatten(self, jaxpr, keys: List[int]) -> List[int]:
        env = dict(zip(list(jaxpr.constvars) + list(jaxpr.invars), keys))

        def key_of(var):
            return self._constant(var.val, var.aval) if isinstance(var, jcore.Literal) else env[var]

        for eqn in jaxpr.eqns:
            inputs = [key_of(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in _CALLS and _CALLS[name] in eqn.params:
                inner = eqn.params[_CALLS[name]]
                if isinstance(inner, jcore.ClosedJaxpr):
                    inner_consts = [self._constant(c, v.aval) for c, v in zip(inner.consts, inner.jaxpr.constvars)]
                    outputs = self._flatten(inner.jaxpr, inner_consts + inputs)
                else:
                    outputs = self._flatten(inner, inputs)
            else:
                outputs = [self._variable(v) for v in eqn.outvars]
                self.steps.append(_Step(eqn.primitive, dict(eqn.params), inputs, outputs))
            env.update(zip(eqn.outvars, outputs))
        return [key_of(v) for v in jaxpr.outvars]

    def _fold(self) -> None:
        kept = []
        for step in self.steps:
            if all(k in self.values for k in step.inputs):
                inputs = [self.values[k] for k in step.inputs]
                largest = max([FOLD_MAX_ELEMENTS] + [int(np.size(x)) for x in inputs])
                outs = step.primitive.bind(*inputs, **step.params)
                outs = outs if step.primitive.multiple_results else [outs]
                if all(int(np.size(o)) <= largest for o in outs):
                    for key, value in zip(step.outputs, outs):
                        self.values[key] = value
                    continue
            kept.append(step)
        self.steps = kept

    def _drop_dead(self) -> None:
        live = set(self.outputs)
        kept = []
        for step in reversed(self.steps):
            if live.intersection(step.outputs):
                live.update(step.inputs)
                kept.append(step)
        self.steps = kept[::-1]
        self.values = {k: v for k, v in self.values.items() if k in live}
        self.avals = {k: v for k, v in self.avals.items() if k in live}

    def __call__(self, *args) -> Tuple[Any, ...]:
        """The program's outputs for `args` (the jaxpr's inputs), rewrites applied."""
        return self.segment(self.inputs, self.steps, self.outputs)(*args)

    def segment(self, inputs: Sequence[int], steps: Sequence[_Step], outputs: Sequence[int]) -> Callable:
        """The function of the values `inputs` that runs `steps` and returns the values `outputs`."""

        def run(*args):
            env = dict(self.values)
            env.update(zip(inputs, args))
            for step in steps:
                env.update(zip(step.outputs, _apply(step, [env[k] for k in step.inputs])))
            return tuple(env[k] for k in outputs)

        return run

    def segments(self, max_steps: int) -> List[Tuple[List[int], List[_Step], List[int]]]:
        """The steps cut into consecutive pieces of at most `max_steps`, each as (the values it
        reads from the program's inputs or earlier pieces, its steps, the values that later pieces
        or the program's outputs read)."""
        count = max(1, -(-len(self.steps) // max_steps))
        size = -(-len(self.steps) // count)
        pieces = [self.steps[i:i + size] for i in range(0, len(self.steps), size)] or [[]]
        produced = [{k for step in piece for k in step.outputs} for piece in pieces]
        read = [{k for step in piece for k in step.inputs if k not in self.values or k in self.lifted}
                for piece in pieces]
        result = []
        for i, piece in enumerate(pieces):
            inputs = sorted(read[i] - produced[i])
            later = set(self.outputs).union(*read[i + 1:])
            result.append((inputs, piece, sorted(produced[i] & later)))
        return result


SEGMENT_STEPS = 250   # jax2onnx's time per equation grows with the graph: it converts pieces of this many


def _value_name(key: int) -> str:
    return f"v{key}"


def to_onnx_model(fn: Callable, example_args: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
                  output_names: Sequence[str], model_name: str = "detr", segment_steps: int = SEGMENT_STEPS):
    """`fn(*example_args)` as an `onnx.ModelProto` (fixed shapes), converted from its `Program`.

    jax2onnx checks, for every equation, its outputs against every node and initializer built so
    far, so its time grows with the square of the number of equations (R50-DC5 panoptic: 2745
    after folding, 3 to 5 minutes in one piece).  The program is therefore converted in pieces of
    `segment_steps` steps, which are then joined into one graph (`join_graphs`) with the same
    nodes.
    """
    from jax2onnx import to_onnx

    program = Program(jax.make_jaxpr(fn)(*example_args))
    parts = []
    for inputs, steps, outputs in program.segments(segment_steps):
        specs = [jax.ShapeDtypeStruct(np.shape(program.avals[k]), program.avals[k].dtype) for k in inputs]
        parts.append(to_onnx(program.segment(inputs, steps, outputs), specs, model_name=model_name,
                             input_names=[_value_name(k) for k in inputs],
                             output_names=[_value_name(k) for k in outputs]))
    renames = {_value_name(k): name for k, name in zip(program.inputs + program.outputs,
                                                       list(input_names) + list(output_names))}
    constants = {_value_name(k): program.constant(k) for k in program.lifted}
    return join_graphs(parts, renames, model_name, constants)


def join_graphs(parts: Sequence[Any], renames: Dict[str, str], model_name: str,
                constants: Optional[Dict[str, np.ndarray]] = None):
    """One ONNX model from `parts` whose graphs pass values by name (`v<key>`): the parts' inputs
    that no earlier part produces become the model's inputs; `renames` names the model's inputs and
    outputs (outputs in its order); the parts' inputs named in `constants` become initializers
    of these values; every other name gets its part's prefix."""
    import onnx
    import onnx.numpy_helper

    constants = constants or {}
    shared = {v.name for part in parts for v in list(part.graph.input) + list(part.graph.output)}
    graph = onnx.GraphProto(name=model_name)
    produced, inputs_seen, outputs = set(), set(), []
    for i, part in enumerate(parts):
        rename = lambda name: renames.get(name, name) if name in shared else (f"p{i}_{name}" if name else name)  # noqa: E731
        for node in part.graph.node:
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            node.name = f"p{i}_{node.name}"
            for attribute in node.attribute:
                if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise NotImplementedError("join_graphs: nodes with subgraphs are not supported")
        for tensor in part.graph.initializer:
            tensor.name = rename(tensor.name)
        for info in part.graph.value_info:
            info.name = rename(info.name)
        for value in part.graph.input:
            if value.name not in produced and value.name not in inputs_seen:
                inputs_seen.add(value.name)
                if value.name in constants:
                    graph.initializer.append(onnx.numpy_helper.from_array(constants[value.name], value.name))
                else:
                    value.name = rename(value.name)
                    graph.input.append(value)
        produced.update(v.name for v in part.graph.output)
        graph.node.extend(part.graph.node)
        graph.initializer.extend(part.graph.initializer)
        graph.value_info.extend(part.graph.value_info)
        for value in part.graph.output:
            if renames.get(value.name, value.name) != value.name:
                value.name = renames[value.name]
                outputs.append(value)
    order = {name: i for i, name in enumerate(renames.values())}
    graph.output.extend(sorted(outputs, key=lambda value: order[value.name]))
    opsets = {}
    for part in parts:
        for opset in part.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                   producer_name="detr_jax.export (jax2onnx)")
    model.ir_version = max(part.ir_version for part in parts)
    functions = {}
    for part in parts:
        functions.update({(f.domain, f.name): f for f in part.functions})
    model.functions.extend(functions.values())
    missing = set(renames.values()) - {v.name for v in list(graph.input) + list(graph.output)}
    if missing:
        raise ValueError(f"join_graphs: {sorted(missing)} are neither inputs nor computed outputs of the parts")
    return model


def save_onnx(model, path: pathlib.Path) -> pathlib.Path:
    """Write `model` to `path` (weights inside the file up to protobuf's 2 GB limit)."""
    import onnx

    onnx.save(model, str(path))
    return path
