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
