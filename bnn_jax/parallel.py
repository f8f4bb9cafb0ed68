"""Data parallelism on a device mesh: one axis ``data``, state replicated, batch sharded.

The steps are ``jax.jit`` with explicit shardings, so BatchNorm statistics
cover the global batch (synchronised BN); the ``per_device`` mode runs the train
step under ``shard_map`` instead (per-device BatchNorm, averaged gradients, as
PyTorch DDP). Multi-host runs start with :func:`initialize_distributed`; each
process feeds its own shard. Host batches (per process) become
global arrays with ``jax.make_array_from_process_local_data`` and are put on
the devices ahead of use.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnn_jax.errors import ConfigError

DATA_AXIS = "data"


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` from the ``parallel`` config section, before any JAX work.

  Unset fields are detected from the cluster's environment (SLURM, Open MPI, Cloud TPU,
  Kubernetes), so ``parallel.distributed=True`` alone is enough there.
  """
  if not config.distributed:
    return
  jax.distributed.initialize(coordinator_address=config.coordinator_address or None,
                             num_processes=config.num_processes, process_id=config.process_id)


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int, what: str = "global batch size") -> int:
  """The per-process batch; a clear error when ``global_batch`` does not split over the devices."""
  devices = jax.device_count()
  if global_batch < 1:
    raise ConfigError(f"{what} must be positive, not {global_batch}")
  if global_batch % devices:
    raise ConfigError(f"{what} {global_batch} is not divisible by the {devices} devices; "
                      f"use a multiple of {devices}")
  return global_batch // jax.process_count()


def run_once_compiler_options() -> Optional[dict]:
  """XLA options for programs that run once (initialisation): on CPU, LLVM without its
  optimisations and XLA:CPU's older elemental emitters instead of its MLIR fusion emitters,
  which together compile in a third of the time (seconds per run start) and barely slow them
  (initial values stay bit-identical)."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


MODES = ("sharded", "per_device")


def jit_train_step(train_step, mesh: Mesh, mode: str = "sharded"):
  """(state, batch, sums, teacher_variables) -> (state, sums, scheduled values); state and sums
  donated, the teacher replicated like the state.

  ``sharded``: one program over the global batch (BatchNorm statistics of the global batch).
  ``per_device``: ``train_step`` must be made with ``axis_name=DATA_AXIS``; it runs on each
  device's shard under ``shard_map`` (PyTorch DDP's semantics).
  """
  if mode not in MODES:
    raise ConfigError(f"unknown parallel mode {mode!r}; valid: {list(MODES)}")
  rep, data = replicated(mesh), batch_sharded(mesh)
  if mode == "per_device":
    # check_vma=False: the step itself averages (pmean) gradients and statistics and sums
    # (psum) metrics; with the check on, JAX would also sum the gradients of replicated inputs.
    train_step = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(), P()),
                               out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(train_step, in_shardings=(rep, data, rep, rep), out_shardings=(rep, rep, rep),
                 donate_argnums=(0, 2))


def jit_eval_step(eval_step, mesh: Mesh):
  rep, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(rep, data, rep), out_shardings=rep, donate_argnums=(2,))


def to_global(batch: dict, mesh: Mesh) -> dict:
  """A process-local numpy batch -> global arrays sharded along ``data``."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def prefetch_to_devices(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
  """Keeps ``size`` batches already transferred, so the devices never wait on the host copy."""
  queue = collections.deque()
  iterator = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(to_global(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
