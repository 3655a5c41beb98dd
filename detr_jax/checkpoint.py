"""Model checkpoints (I/O only): an orbax checkpoint of the Flax variables with the model config.

Layout of a checkpoint folder:
    config.json      {"model": ModelConfig fields, "format": 1, "source": ...}
    variables/       orbax StandardCheckpointer tree {'params': ..., 'buffers': ...}

`detr_jax.load(path)` (`detr_jax.runtime.load`) reads one into a ready `DETRModel`; training
exports the same layout for inference.  The variable tree to restore into comes from
`detr_jax.models.abstract_variables`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Dict, Optional

import jax
import numpy as np

from detr_jax.config import ModelConfig
from detr_jax.models import abstract_variables

FORMAT_VERSION = 1


def save(path, config: ModelConfig, variables: Dict[str, Any], source: Optional[str] = None) -> pathlib.Path:
    """Write `variables` (numpy or jax arrays) and `config` to the folder `path` (replaced if present)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "model": config.to_dict(), "source": source}
    # collections without arrays (the `buffers` of a model without frozen BatchNorm, as training
    # exports them) are left out: the restore tree (`abstract_variables`) has none
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
    """The variables of the checkpoint folder `path` (float32 jax arrays), restored into
    `config`'s variable tree."""
    import orbax.checkpoint as ocp

    abstract = {name: tree for name, tree in abstract_variables(config).items() if jax.tree_util.tree_leaves(tree)}
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(path).absolute() / "variables", abstract)
