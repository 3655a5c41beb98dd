"""Export a DETR for serving: StableHLO (`jax.export`) or ONNX (`jax2onnx`).

    from detr_jax.export import ExportSpec, export_checkpoint
    export_checkpoint("detr_r50", "exported", format="onnx", spec=ExportSpec(height=800, width=1088))

writes, into the output folder, the artifact (`model.stablehlo` or `model.onnx`) and
`contract.json` (see `program.contract`: input/output names, shapes, dtypes, mask polarity and
normalization); StableHLO exports also get `serve_stablehlo.py`, a loader that needs JAX alone.
The model's numbers are those of `DETR.apply` (padding-invariant mode, dense attention).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.config import ModelConfig
from detr_jax.export.program import FORMATS, ExportSpec, check_spec, contract, serving_function

__all__ = ["ExportSpec", "FORMATS", "export_checkpoint", "export_model", "contract", "serving_function"]

CONTRACT_FILE = "contract.json"
ONNX_FILE = "model.onnx"


def input_specs(contract_data: Dict[str, Any]):
    """(shape, dtype) of each input of a contract ("B" for a dynamic batch)."""
    return [(tuple(t["shape"]), jnp.dtype(t["dtype"])) for t in contract_data["inputs"]]


def check_request(config: ModelConfig, format: str, spec: ExportSpec) -> None:
    """Raise ValueError naming the problem when `config` cannot be exported to `format` as `spec` says."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; known: {list(FORMATS)}")
    check_spec(config, spec)
    if format == "onnx" and spec.batch is None:
        raise ValueError("ONNX export takes a fixed batch size (--batch N); a dynamic batch is for StableHLO")
    if format == "onnx" and spec.dtype != "float32":
        raise ValueError(f"ONNX export computes in float32 only: onnxruntime's CPU kernels have no {spec.dtype} "
                         f"Einsum, so the graph would not load; export {spec.dtype} to StableHLO")


def export_model(config: ModelConfig, variables: Dict[str, Any], out, *, format: str, spec: ExportSpec
                 ) -> pathlib.Path:
    """Export the model (`config`, `variables`) as `spec` says into the folder `out` (created).

    Returns the artifact's path.  Raises ValueError for an unknown format or a spec the model
    cannot take (`program.check_spec`: sizes must be multiples of the output stride).
    """
    check_request(config, format, spec)
    io = contract(config, spec)
    fn = serving_function(config, variables, spec)
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "stablehlo":
        from detr_jax.export.stablehlo import export_stablehlo, symbolic_args, write_stablehlo

        exported = export_stablehlo(fn, symbolic_args(input_specs(io)))
        path = write_stablehlo(exported, folder)
        io["platforms"] = list(exported.platforms)
    else:
        from detr_jax.export.onnx import save_onnx, to_onnx_model

        args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in input_specs(io)]
        model = to_onnx_model(fn, args, [t["name"] for t in io["inputs"]], [t["name"] for t in io["outputs"]])
        path = save_onnx(model, folder / ONNX_FILE)
    io["format"] = format
    io["artifact"] = path.name
    (folder / CONTRACT_FILE).write_text(json.dumps(io, indent=1))
    return path


def export_checkpoint(checkpoint, out, *, format: str, spec: ExportSpec) -> pathlib.Path:
    """`export_model` of a detr-jax checkpoint folder (see `detr_jax.checkpoint`)."""
    from detr_jax.checkpoint import load_variables, read_config

    if format not in FORMATS:     # before reading anything
        raise ValueError(f"unknown export format {format!r}; known: {list(FORMATS)}")
    config = read_config(checkpoint)
    check_request(config, format, spec)     # before reading the weights
    variables = jax.tree_util.tree_map(np.asarray, load_variables(checkpoint, config))
    return export_model(config, variables, out, format=format, spec=spec)
