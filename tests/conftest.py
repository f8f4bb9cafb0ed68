"""Shared test helpers: paths into ../shared and small-model builders."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BNN_JAX_SHARED", REPO.parent / "shared"))
PARITY_DIR = SHARED / "reference" / "parity"
KEYS_DIR = SHARED / "reference" / "state_dict_keys"


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"shared/ not found at {SHARED} (set BNN_JAX_SHARED)")
  return SHARED
