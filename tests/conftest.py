"""Shared test helpers: where the reference fixtures of the original DETR live.

The full fixture folder is found through the environment variable DETR_REFERENCE_DIR (default:
`../shared/fixtures/detr_reference` beside the repository).  `tests/data/` holds a small copy of
the essential parts, so the core parity tests also run from a plain clone; tests that need
arrays found in neither place are skipped with a message naming what is missing.
"""
from __future__ import annotations

import os
import pathlib
from typing import Dict, Iterable, Optional

import numpy as np
import pytest

# The suite's programs are small, so compiling them costs more than running them.  XLA:CPU's own
# code generation (the fusions LLVM compiles; convolutions and dots are library calls either way)
# therefore runs at LLVM -O0: two train-step tests of test_train.py took 139 s at the default
# level and 84 s at -O0, one after the other on 2 cores that a training run also used.  No
# fast-math is involved, so the arithmetic is
# the same IEEE float32 and the fidelity tests hold unchanged.  Set at import, before any backend
# starts, and inherited by the subprocesses the tests start (`with_test_xla_flags` for those that
# set XLA_FLAGS themselves).  DETR_TESTS_FULL_OPTIMIZATION=1 keeps XLA's default level.
TEST_XLA_FLAGS = "" if os.environ.get("DETR_TESTS_FULL_OPTIMIZATION") == "1" else "--xla_backend_optimization_level=0"


def with_test_xla_flags(flags: str = "") -> str:
    """`flags` (an XLA_FLAGS value) plus the suite's compile options, unless they already set the level."""
    if "xla_backend_optimization_level" in flags:
        return flags
    return " ".join(f for f in (flags, TEST_XLA_FLAGS) if f)


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

REPO = pathlib.Path(__file__).resolve().parent.parent
TEST_DATA = REPO / "tests" / "data"
FIXTURE_DIR = pathlib.Path(
    os.environ.get("DETR_REFERENCE_DIR", str(REPO.parent / "shared" / "fixtures" / "detr_reference")))


def reference_path(name: str) -> pathlib.Path:
    """The fixture file `name`, from the fixture folder or else tests/data; skip if absent."""
    for folder in (FIXTURE_DIR, TEST_DATA):
        if (folder / name).exists():
            return folder / name
    pytest.skip(f"reference fixture {name!r} is missing: not in {FIXTURE_DIR} (set DETR_REFERENCE_DIR) "
                f"nor in {TEST_DATA}")


PHOTOS = FIXTURE_DIR / "photos"


def fixture_photos(*names: str):
    """Paths of the fixture photos `names` (only the full fixture folder has them); skip if absent."""
    paths = [PHOTOS / f"{name}.png" for name in names]
    if not all(p.exists() for p in paths):
        pytest.skip(f"the fixture photos {list(names)} are not in {PHOTOS} (set DETR_REFERENCE_DIR)")
    return paths


def random_images(sizes, padded_hw, seed=0):
    """(normal noise float32 [B, H, W, 3], bool mask [B, H, W]): image i fills the top-left
    `sizes[i]` of the padded `padded_hw` (zeros and False elsewhere)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(sizes), *padded_hw, 3), np.float32)
    mask = np.zeros((len(sizes), *padded_hw), bool)
    for i, (h, w) in enumerate(sizes):
        x[i, :h, :w] = rng.standard_normal((h, w, 3))
        mask[i, :h, :w] = True
    return x, mask


def reference_arrays(name: str, keys: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Arrays of a fixture `.npz`; skips if a requested key is only in the full fixture folder."""
    path = reference_path(name)
    with np.load(path) as data:
        wanted = list(keys) if keys is not None else list(data.files)
        missing = [k for k in wanted if k not in data.files]
        if missing:
            pytest.skip(f"{path} lacks {missing} (only the full fixture folder has them; "
                        f"set DETR_REFERENCE_DIR)")
        return {k: data[k] for k in wanted}


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    return FIXTURE_DIR


def load_recipe_module():
    """The fixture's `make_checkpoint.py` (the weight recipe's reference implementation)."""
    import importlib.util

    path = reference_path("make_checkpoint.py")
    spec = importlib.util.spec_from_file_location("detr_reference_make_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def recipe_state_dict():
    """The 490 recipe tensors (original key layout, numpy), checked against the recipe's sha256 list."""
    import json

    recipe = load_recipe_module()
    meta = json.loads(reference_path("recipe.json").read_text())
    state_dict = recipe.make_state_dict(meta["seed"])
    bad = [k for k, v in state_dict.items() if meta["sha256"][k] != recipe.sha256_of(v)]
    assert not bad, f"recipe tensors differ from recipe.json: {bad[:5]}"
    return state_dict


@pytest.fixture(scope="session")
def recipe_pth(recipe_state_dict, tmp_path_factory) -> pathlib.Path:
    """The recipe written as an original release file, `torch.save({'model': state_dict})`."""
    torch = pytest.importorskip("torch", reason="writing the recipe .pth needs torch (pip install -e '.[dev]')")
    path = tmp_path_factory.mktemp("recipe") / "detr-r50-dc5-panoptic-recipe.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in recipe_state_dict.items()}}, path)
    return path


@pytest.fixture(scope="session")
def converted_dir(recipe_pth, tmp_path_factory) -> pathlib.Path:
    """The recipe .pth converted by `convert_weights.py` (run as a user would, in a subprocess)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("converted") / "detr_r50_dc5_panoptic"
    result = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(recipe_pth), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def reference_model(converted_dir):
    import detr_jax

    return detr_jax.load(converted_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A randomly initialized `detr_tiny` checkpoint folder (fast tests of whole pipelines)."""
    import jax

    from detr_jax.checkpoint import save
    from detr_jax.config import load_config
    from detr_jax.models import init_variables

    config = load_config("detr_tiny").model
    path = tmp_path_factory.mktemp("tiny") / "detr_tiny"
    save(path, config, init_variables(config, jax.random.PRNGKey(0)))
    return path
