"""Shared test fixtures: paths into ../shared, and a compilation cache for the session."""
import os
import pathlib
import tempfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BNN_JAX_SHARED", REPO.parent / "shared"))
PARITY_DIR = SHARED / "reference" / "parity"
KEYS_DIR = SHARED / "reference" / "state_dict_keys"

# Many tests compile the same steps (a run, its resume, its rerun): a persistent cache, new for
# each session, compiles each program once. Compiles dominate this suite on a small CPU.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bnn_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"shared/ not found at {SHARED} (set BNN_JAX_SHARED)")
  return SHARED
