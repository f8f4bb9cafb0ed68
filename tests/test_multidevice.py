"""Data parallelism on 8 simulated CPU devices (each case in a subprocess: XLA_FLAGS must be set
before JAX starts): sharded = 1 device, per-device = DDP by hand, checkpoints across topologies,
and two processes through jax.distributed."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnn_jax import parallel
from bnn_jax.checkpoint import Checkpoints
from bnn_jax.evaluate import evaluate_checkpoint
from bnn_jax.models import build_model
from bnn_jax.variables import variable_kinds

from conftest import REPO, RUN_ONCE_FLAGS
from helpers import digits_config

pytestmark = pytest.mark.slow


def run(args, devices, **kwargs):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
             XLA_FLAGS=f"{RUN_ONCE_FLAGS} --xla_force_host_platform_device_count={devices}")
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_eight_devices_match_one_device_and_ddp_by_hand():
  """One 8-device subprocess measures every case (the module fixture it replaced ran once per
  pytest-xdist worker, i.e. twice)."""
  measured = json.loads(run(["tests/multidevice_worker.py"], 8).strip().splitlines()[-1])
  # The sharded step equals one device's.
  assert measured["sharded"]["loss"] < 1e-6
  assert measured["sharded"]["grads"] < 1e-4
  assert measured["sharded"]["batch_stats"] < 1e-5
  # The per-device step equals the averaged per-shard computation, and BatchNorm per device differs.
  assert measured["per_device"]["loss"] < 1e-6
  assert measured["per_device"]["grads"] < 1e-4
  assert measured["per_device"]["batch_stats"] < 1e-5
  assert measured["per_device"]["differs_from_sharded"] > 1e-3
  # Ghost BatchNorm does not depend on the device count; its groups really change the step.
  assert measured["ghost"]["loss"] < 1e-6
  assert measured["ghost"]["grads"] < 1e-4
  assert measured["ghost"]["batch_stats"] < 1e-5
  assert measured["ghost"]["differs_from_global"] > 1e-3
  # Groups of the per-device batch are PyTorch DDP's per-GPU BatchNorm.
  assert measured["ghost"]["groups_of_2_vs_per_device"] < 1e-4
  assert measured["ghost"]["groups_of_2_vs_per_device_stats"] < 1e-5
  # An indivisible global batch is a clear error.
  assert measured["indivisible_error"] == (
      "global batch size 12 is not divisible by the 8 devices; use a multiple of 8")


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_train_with_bop_and_evaluate_on_1_and_2_devices(tmp_path):
  """Multi-host on one machine: 2 processes × 4 CPU devices through jax.distributed (gloo); only
  process 0 reports. Trained with Bop on the binary kernels (Adam on the rest): a per-kind
  optimizer on 8 devices, its checkpoint's kernels still ±1 when evaluated on 1 device and on 2.
  (One run for what two tests checked: 2 processes × 2 devices, and 1 process of 8.)"""
  workdir = str(tmp_path / "run")
  common = ["--config=configs/quickstart.py", f"--workdir={workdir}", "--config.model.stem_channels=8",
            "--config.model.base_channels=8"]
  flags = common + ["--config.train.max_steps=4", "--config.train.progress=False",
                    "--config.train.plot=False", "--config.optimizer.binary.name=bop",
                    "--config.optimizer.binary.threshold=1e-6",
                    "--config.parallel.distributed=True", "--config.parallel.num_processes=2",
                    f"--config.parallel.coordinator_address=localhost:{free_port()}"]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", XLA_FLAGS=RUN_ONCE_FLAGS, PYTHONPATH=str(REPO))
  processes = [subprocess.Popen([sys.executable, "-m", "bnn_jax.train", *flags,
                                 f"--config.parallel.process_id={i}"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  trained = outputs[0][0]
  assert "8 cpu device(s) in 2 process(es)" in trained
  assert "flip_ratio" in trained and "gamma/binary" in trained
  assert "final:" in trained and "final:" not in outputs[1][0]  # process 0 alone reports
  here = parallel.replicated(parallel.make_mesh())  # restored onto this process's device
  saved = jax.device_get(Checkpoints(workdir, read_only=True).saved_tree(None, here)[1]["params"])
  kinds = variable_kinds(build_model(digits_config().model), (1, 8, 8, 1)).kinds
  binary = [w for w, kind in zip(jax.tree.leaves(saved), jax.tree.leaves(kinds)) if kind == "binary"]
  assert binary and all(set(np.unique(np.asarray(w))) == {-1.0, 1.0} for w in binary)
  results = [evaluate_checkpoint(digits_config(), workdir),  # here, on this process's 1 device
             json.loads(run(["-m", "bnn_jax.evaluate", *common, "--json"], 2).splitlines()[-1])]
  for key in ("top1", "top5", "num_examples", "step"):
    assert results[0][key] == results[1][key]
  assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)  # summation order
  assert results[0]["step"] == 4 and results[0]["num_examples"] == 360
  final = next(line for line in trained.splitlines() if line.startswith("final:"))
  assert f"eval top-1 {results[0]['top1']:.2%}" in final
