"""StableHLO export through `jax.export`, with a symbolic batch dimension when asked.

The artifact is `jax.export.Exported.serialize()`: the StableHLO module with the weights as
constants, for the CPU (and the platforms given).  `serve_stablehlo.py`, copied beside it, loads
and runs it with JAX alone.
"""
from __future__ import annotations

import pathlib
import shutil
from typing import Callable, Sequence

import jax

from detr_jax.export import serve_stablehlo


def export_stablehlo(fn: Callable, args: Sequence[jax.ShapeDtypeStruct],
                     platforms: Sequence[str] = ("cpu",)) -> "jax.export.Exported":
    """`jax.export` of `fn` at the shapes of `args` (a dimension named by a string is symbolic)."""
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def symbolic_args(shapes_and_dtypes, batch_symbol: str = "B"):
    """ShapeDtypeStructs for (shape, dtype) pairs whose dimensions may be the string `batch_symbol`:
    all of them share one symbolic dimension."""
    (b,) = jax.export.symbolic_shape(batch_symbol)
    return [jax.ShapeDtypeStruct(tuple(b if d == batch_symbol else d for d in shape), dtype)
            for shape, dtype in shapes_and_dtypes]


def write_stablehlo(exported: "jax.export.Exported", folder: pathlib.Path) -> pathlib.Path:
    """Write the artifact and its loader into `folder`; returns the artifact's path."""
    path = folder / serve_stablehlo.ARTIFACT
    path.write_bytes(exported.serialize())
    shutil.copyfile(serve_stablehlo.__file__, folder / "serve_stablehlo.py")
    return path
