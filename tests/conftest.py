"""Shared test fixtures: paths into ../shared, and a compilation cache for the session."""
import fcntl
import json
import os
import pathlib
import tempfile

import jax
import pytest

import bnn_jax  # noqa: F401  (its XLA:CPU flags, before any computation)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BNN_JAX_SHARED", REPO.parent / "shared"))
PARITY_DIR = SHARED / "reference" / "parity"
KEYS_DIR = SHARED / "reference" / "state_dict_keys"

# Many tests compile the same steps (a run, its resume, its rerun): a persistent cache, new for
# each session, compiles each program once. Compiles dominate this suite on a small CPU. The
# pytest-xdist workers of one session share it (their run's id names it): a program that one
# worker compiled, the other loads (a read that meets a half-written entry only recompiles).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE = (os.path.join(tempfile.gettempdir(), f"bnn_jax_xla_cache_{_RUN}") if _RUN else
          tempfile.mkdtemp(prefix="bnn_jax_xla_cache_"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# XLA_FLAGS for test subprocesses that compile many programs and run each a few times: LLVM at
# -O0 halves their compiles (the same programs; only the machine code is less tuned).
FAST_COMPILE = "--xla_backend_optimization_level=0"
# With XLA:CPU's elemental emitters instead of its MLIR fusion emitters too (what
# parallel.run_once_compiler_options gives a program in-process) a third of the compile. -O0
# code runs the quickstart's step at batch 64 about 15x slower either way: for a few small steps.
RUN_ONCE_FLAGS = f"{FAST_COMPILE} --xla_cpu_use_fusion_emitters=false"


# Most tests compile programs that they run once or a few times on small inputs: without LLVM's
# optimisations (jax_disable_most_optimizations: -O0, the same results) those compile in about
# half the time. Tests of the digits run keep its optimised programs (the cache holds them; they
# run dozens of its steps), and the packed-inference and benchmark tests are left as they were.
OPTIMISED_MODULES = ("test_packed.py", "test_benchmark.py")


@pytest.fixture(autouse=True)
def _compile_fast(request):
  if "digits_run" in request.fixturenames or request.path.name in OPTIMISED_MODULES:
    yield
    return
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"shared/ not found at {SHARED} (set BNN_JAX_SHARED)")
  return SHARED


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, worker_id):
  """Two epochs of the width-8 quickstart on digits, never stopped: 46 steps, 23 per epoch (the
  last batch of each filled from the epoch's start), checkpoints at 23 and 46, evaluated at 46.
  Its binary kernels are trained by Bop (±1, larq's CaseOptimizer with Adam on the rest), so
  resuming, evaluating and damaging it covers a per-kind optimizer's state too.
  Shared by the tests that resume, damage, evaluate or refuse it (they never change it), and by
  both pytest-xdist workers: the first to need it trains it (the other waits), in the directory
  above their own temporary ones (new each session); its programs are in the shared cache."""
  from bnn_jax.train import train_and_evaluate
  from helpers import digits_config
  config = digits_config(epochs=2, eval_every_epochs=2, checkpoint_every_epochs=1, max_to_keep=2)
  config.optimizer.binary.update(name="bop", threshold=1e-6, gamma=1e-2)
  if worker_id == "master":  # no workers
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    return config, workdir, train_and_evaluate(config, workdir)
  root = tmp_path_factory.getbasetemp().parent
  workdir, metrics = root / "digits_run", root / "digits_run.json"
  with open(root / "digits_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not metrics.exists():
      metrics.write_text(json.dumps(train_and_evaluate(config, str(workdir))))
  return config, str(workdir), json.loads(metrics.read_text())
