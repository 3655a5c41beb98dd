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

# The suite's programs are small, so compiling them costs more than running them.  Two XLA:CPU
# options make compiling cheaper without touching the arithmetic (no fast-math: the same IEEE
# float32, and the fidelity tests hold unchanged):
# - LLVM at -O0 for XLA's own code (the fusions; convolutions and dots are library calls either
#   way): two train-step tests of test_train.py took 139 s at the default level and 84 s at -O0,
#   one after the other on 2 cores that a training run also used;
# - the fusions emitted by XLA's classic LLVM IR emitters rather than its newer MLIR ones: two
#   test_models.py tests and one test_train.py test took 80.6 s with the newer and 55.8 s with the
#   classic ones, both at -O0, on an otherwise idle 2-core machine (2026-12-05).
# Set at import, before any backend starts, and inherited by the subprocesses the tests start
# (`with_test_xla_flags` for those that set XLA_FLAGS themselves).  DETR_TESTS_FULL_OPTIMIZATION=1
# keeps XLA's defaults.
TEST_XLA_FLAGS = () if os.environ.get("DETR_TESTS_FULL_OPTIMIZATION") == "1" else (
    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_test_xla_flags(flags: str = "") -> str:
    """`flags` (an XLA_FLAGS value) plus those of the suite's compile options it does not set itself."""
    own = [f for f in TEST_XLA_FLAGS if f.split("=")[0].lstrip("-") not in flags]
    return " ".join(f for f in (flags, *own) if f)


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


def share_compilation_cache() -> None:
    """One JAX persistent compilation cache for the whole run: the pytest workers and every
    subprocess the tests start (they inherit the environment) skip the XLA compilation of a program
    that another test already compiled.  Many tests build the same tiny models at the same shapes;
    programs with host callbacks (the scipy matcher's train steps) are never cached by JAX.  The
    process that creates the folder (pytest itself, or its xdist controller, whose workers inherit
    it) removes it at exit.  DETR_TESTS_NO_COMPILATION_CACHE=1, or a JAX_COMPILATION_CACHE_DIR of
    one's own, opts out."""
    if os.environ.get("DETR_TESTS_NO_COMPILATION_CACHE") == "1" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="detr_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=folder, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


share_compilation_cache()

# `make test` runs two pytest-xdist workers, a module whole on one worker (`--dist loadscope`), in
# collection order (`--no-loadscope-reorder`).  The modules that take minutes start first, longest
# first, so that the short ones fill the gaps and both workers finish together.  The order is that
# of their times in a two-worker run of the whole suite on 2026-12-06 (2 cores shared with a
# training run), after test_train.py's overfitting run went from 400 steps to 100; the other
# modules follow in pytest's order.
LONGEST_MODULES_FIRST = (
    "test_train_multiprocess.py", "test_fidelity.py", "test_bench_accelerator.py", "test_train.py",
    "test_models.py", "test_export.py", "test_predict.py", "test_demo.py", "test_training_queries.py",
    "test_mixed_precision.py", "test_postprocess.py", "test_convert.py", "test_data_tfds.py",
    "test_cli_predict.py", "test_runtime.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a module's own order stays

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
