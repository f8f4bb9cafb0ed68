"""``python -m bnn_jax.export --config CONFIG --workdir DIR --out FILE [--format F] [--step N]``.

``--format packed-npz`` (default) writes a trained model for bit-packed inference
(:mod:`bnn_jax.packed`): binary kernels as packed bits with one scale per output channel, every
other variable as is, in one ``.npz`` that numpy reads alone (the keys are documented in
``packed.py``); ``bnn_jax.packed.load(FILE)`` returns the jitted ``images -> logits``. Prints the
file's size next to the float variables' and the checkpoint's.

``--format stablehlo`` writes the packed model as a deployable artifact (:mod:`bnn_jax.stablehlo`):
a serialised ``jax.export`` program of the pure-JAX packed path plus its weights in one ``.npz``,
which jax and numpy run alone (no bnn_jax, no Flax), on the CPU or a CUDA GPU, any batch size.

``--format keras-h5`` writes a Larq Zoo model's variables as larq-zoo's Keras weight file
(:mod:`bnn_jax.keras_weights`): larq-zoo loads it with ``weights=FILE`` (and Larq Compute Engine
converts the Keras model for ARM devices).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
import numpy as np
from absl import flags

from bnn_jax import cli, keras_weights, packed, stablehlo
from bnn_jax.errors import ConfigError
from bnn_jax.evaluate import restore_checkpoint


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


@contextlib.contextmanager
def written_atomically(out: str) -> Iterator[str]:
  """A temporary path beside ``out`` for the ``with`` block to write, renamed to ``out`` when the
  block succeeds and removed when it fails: ``out`` is never a truncated file (a full disk), and a
  file it replaces stays whole until then. Where nothing can be written (a missing or read-only
  directory) it fails at once; every failure to write is one line (ConfigError)."""
  directory, name = os.path.split(os.path.abspath(out))
  temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
  try:
    open(temporary, "wb").close()
    yield temporary
    os.replace(temporary, out)
  except OSError as error:
    raise ConfigError(f"cannot write {out}: {error.strerror or error}") from None
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)


def _packed_checkpoint(config, workdir: str, step):
  """(experiment, variables on the host, their packed weights, step) of a checkpoint."""
  experiment, variables, step = restore_checkpoint(config, workdir, step)
  variables = jax.device_get(variables)
  weights = packed.pack_weights(experiment.model, variables, experiment.input_shape)
  return experiment, variables, jax.device_get(weights), step


def export(config, workdir: str, out: str, step=None) -> dict:
  """Writes ``out`` (atomically); returns its size, the float variables' and the checkpoint step's,
  in bytes."""
  with written_atomically(out) as temporary:
    experiment, variables, weights, step = _packed_checkpoint(config, workdir, step)
    packed.save(temporary, config.model.to_dict(), experiment.input_shape, variables, weights)
  float_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(variables))
  return {"step": step, "binary_layers": len(weights), "file_bytes": os.path.getsize(out),
          "float_variables_bytes": float_bytes,
          "checkpoint_bytes": directory_bytes(os.path.join(workdir, "checkpoints", str(step)))}


def export_stablehlo(config, workdir: str, out: str, step=None) -> dict:
  """Writes ``out``, the checkpoint's packed model as a jax.export artifact (atomically); returns
  its step, binary layer count, size and the platforms its program runs on."""
  with written_atomically(out) as temporary:
    experiment, variables, weights, step = _packed_checkpoint(config, workdir, step)
    program = stablehlo.save(temporary, experiment.model, config.model.to_dict(), variables,
                             weights, experiment.input_shape[1:])
  return {"step": step, "binary_layers": len(weights), "file_bytes": os.path.getsize(out),
          "platforms": list(program.platforms)}


def export_keras(config, workdir: str, out: str, step=None) -> dict:
  """Writes ``out``, a larq-zoo ``.h5`` weight file of a Larq Zoo model's checkpoint (atomically);
  returns its step, layer count and size."""
  with written_atomically(out) as temporary:
    experiment, variables, step = restore_checkpoint(config, workdir, step)
    layers = keras_weights.flax_to_keras(jax.device_get(variables), experiment.model,
                                         experiment.input_shape)
    keras_weights.write_h5(temporary, layers)
  return {"step": step, "layers": sum(bool(weights) for _, weights in layers),
          "file_bytes": os.path.getsize(out)}


FORMATS = ("packed-npz", "stablehlo", "keras-h5")


def main():
  config = cli.config_flag("The run's config file.")
  workdir = flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
  out = flags.DEFINE_string("out", None, "The file to write (.npz; .h5 for keras-h5).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: latest).")
  file_format = flags.DEFINE_enum("format", "packed-npz", FORMATS,
                                  "packed-npz: bit-packed inference; stablehlo: the packed model "
                                  "as a jax.export program plus weights, run by jax alone; "
                                  "keras-h5: a larq-zoo weight file of a Larq Zoo model.")

  def body():
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    if file_format.value == "keras-h5":
      sizes = export_keras(config.value, workdir.value, out.value, step.value)
      print(f"step {sizes['step']}: {sizes['layers']} Keras layers with weights -> {out.value} "
            f"({mib(sizes['file_bytes'])}); larq-zoo reads it with weights={out.value!r}")
      return
    if file_format.value == "stablehlo":
      sizes = export_stablehlo(config.value, workdir.value, out.value, step.value)
      print(f"step {sizes['step']}: {sizes['binary_layers']} binary layers packed -> {out.value} "
            f"({mib(sizes['file_bytes'])}): a jax.export program for "
            f"{'/'.join(sizes['platforms'])}, any batch size, run with jax alone "
            f"(bnn_jax/stablehlo.py says how)")
      return
    sizes = export(config.value, workdir.value, out.value, step.value)
    print(f"step {sizes['step']}: {sizes['binary_layers']} binary layers packed -> {out.value}: "
          f"{mib(sizes['file_bytes'])}; float variables {mib(sizes['float_variables_bytes'])} "
          f"({sizes['float_variables_bytes'] / sizes['file_bytes']:.1f}x larger); checkpoint with "
          f"optimizer state {mib(sizes['checkpoint_bytes'])}")

  cli.run(body, required=(config, workdir, out))


if __name__ == "__main__":
  main()
