"""XLA:CPU compiler options for DETR's programs, chosen by measurement on DETR's own shapes.

XLA:CPU hands convolutions, dots and reductions to YNNPACK ("library fusions",
`xla_cpu_experimental_ynn_fusion_type`) by default.  For DETR at 800x1066 on 2 cores that is
slower for every convolution and for the mask head's reductions (GroupNorm), and faster for the
encoder's reductions (softmax, LayerNorm), as measured component by component
(`python bench/profile_forward.py --compare-library-fusions`; the figures are in BENCHMARKS.md,
the run of 2026-11-25, 7a6273f).  So the model's program keeps YNNPACK's dots and reductions
(`MODEL`), and the mask head's per-query program, all small-channel convolutions and GroupNorms,
keeps only its dots (`MASK_HEAD`), as does the train step (`TRAIN_STEP`, measured with
`bench/bench_train_step.py`).  These options are the runtime's CPU policy (`detr_jax.runtime`).
The results are those of the same float32 arithmetic with
another summation order (the fidelity tests pass unchanged).  Nothing is changed when the backend
is not the CPU, when `XLA_FLAGS` already sets `--xla_cpu_experimental_ynn_fusion_type`, or when
the installed XLA does not know the option (it is experimental): then XLA's defaults apply.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

LIBRARY_FUSIONS_OPTION = "xla_cpu_experimental_ynn_fusion_type"
DOT, REDUCE, CONVOLUTION = (f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_DOT", "REDUCE",
                                                                      "INDIVIDUAL_CONVOLUTION"))
MODEL = (DOT, REDUCE)
MASK_HEAD = (DOT,)
TRAIN_STEP = (DOT,)


def jit(fn, library_fusions, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` whose CPU programs get `compiler_options(library_fusions)`."""
    options = compiler_options(library_fusions)
    return jax.jit(fn, **jit_kwargs) if options is None else jax.jit(fn, compiler_options=options, **jit_kwargs)


def compiled_per_signature(transformed, library_fusions) -> Callable:
    """`transformed` (a `jax.pmap` or `jax.jit` function, which take no compiler options
    themselves in the pmap case) called through programs compiled with
    `compiler_options(library_fusions)`, one per signature (tree structure, shapes and dtypes of
    the arguments), as `transformed` itself would compile them.  `transformed` unchanged off the CPU
    and with several processes (a multi-host pmap's compiled program takes the global shapes)."""
    options = compiler_options(library_fusions)
    if options is None or jax.process_count() > 1:
        return transformed
    programs: Dict[Any, Any] = {}

    def call(*args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        signature = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if signature not in programs:
            programs[signature] = transformed.lower(*args).compile(compiler_options=options)
        return programs[signature](*args)

    call.programs = programs
    return call


def compiler_options(library_fusions) -> Optional[Dict[str, str]]:
    """`jax.jit(..., compiler_options=...)` that give a CPU program exactly the YNNPACK fusions
    `library_fusions` (e.g. `MODEL`); None (XLA's defaults) off the CPU, when XLA_FLAGS sets the
    option, or when this JAX / XLA rejects it."""
    if jax.default_backend() != "cpu" or LIBRARY_FUSIONS_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    options = ((LIBRARY_FUSIONS_OPTION, ",".join(library_fusions)),)
    return dict(options) if _accepted(options) else None


@functools.lru_cache(maxsize=None)
def _accepted(options) -> bool:
    """Whether XLA compiles a trivial program with `options` (a tuple of (name, value))."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jax.numpy.zeros(2)).compile()
    except Exception:   # noqa: BLE001 - an unknown option or value (XLA's own error types); a JAX without the argument
        return False
    return True
