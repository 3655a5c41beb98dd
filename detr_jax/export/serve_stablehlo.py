"""Run a DETR exported to StableHLO with JAX alone (no detr_jax needed).

`detr-jax export CHECKPOINT OUT --format stablehlo` copies this file beside the artifact:

    OUT/model.stablehlo   the serialized `jax.export.Exported` (weights inside)
    OUT/contract.json     input/output names, shapes, dtypes, mask polarity, normalization
    OUT/serve_stablehlo.py

Usage, in any Python with `jax` (and numpy) installed:

    import numpy as np
    from serve_stablehlo import load
    model = load("OUT")                      # reads model.stablehlo and contract.json
    outputs = model(pixel_values, pixel_mask)   # dict: output name -> numpy array
    # pixel_values float32 [B, H, W, 3]: (rgb / 255 - mean) / std, zero-padded at the bottom/right
    # pixel_mask bool [B, H, W]: True on real pixels

or from the shell: `python serve_stablehlo.py OUT` prints the contract and runs one call on
zeros.  This module imports only the standard library, numpy and jax.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Callable, Dict

import jax
import numpy as np

ARTIFACT = "model.stablehlo"
CONTRACT = "contract.json"


class ExportedModel:
    """An exported DETR: call it with the contract's inputs (numpy or jax arrays) in order or by
    name; it returns a dict of numpy arrays named as the contract's outputs."""

    def __init__(self, folder) -> None:
        folder = pathlib.Path(folder)
        self.contract = json.loads((folder / CONTRACT).read_text())
        self.exported = jax.export.deserialize(bytearray((folder / ARTIFACT).read_bytes()))
        self._call: Callable = jax.jit(self.exported.call)

    @property
    def input_names(self):
        return [t["name"] for t in self.contract["inputs"]]

    @property
    def output_names(self):
        return [t["name"] for t in self.contract["outputs"]]

    def __call__(self, *args, **kwargs) -> Dict[str, np.ndarray]:
        names = self.input_names
        if len(args) + len(kwargs) != len(names) or set(kwargs) - set(names[len(args):]):
            raise TypeError(f"expected the inputs {names}, got {len(args)} positional and {sorted(kwargs)}")
        values = list(args) + [kwargs[name] for name in names[len(args):]]
        for value, spec in zip(values, self.contract["inputs"]):
            shape = tuple(np.shape(value))
            expected = spec["shape"]
            if len(shape) != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
                raise ValueError(f"{spec['name']}: shape {shape}, expected {expected}")
        values = [np.asarray(v, dtype=spec["dtype"]) for v, spec in zip(values, self.contract["inputs"])]
        outputs = self._call(*values)
        return {name: np.asarray(value) for name, value in zip(self.output_names, outputs)}


def load(folder) -> ExportedModel:
    """The model exported to `folder` (model.stablehlo and contract.json)."""
    return ExportedModel(folder)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python serve_stablehlo.py EXPORT_FOLDER", file=sys.stderr)
        return 2
    model = load(argv[0])
    print(json.dumps({k: model.contract[k] for k in ("inputs", "outputs")}, indent=1))
    zeros = [np.zeros([1 if isinstance(d, str) else d for d in t["shape"]], t["dtype"])
             for t in model.contract["inputs"]]
    for name, value in model(*zeros).items():
        print(name, value.shape, value.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
