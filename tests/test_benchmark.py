"""The benchmark harness's JSON: what a GPU/TPU run or CI reads back."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, REPO


@pytest.mark.slow
def test_benchmark_prints_the_documented_json_with_float_twin_and_input_pipeline():
  command = [sys.executable, "scripts/benchmark.py", "--config", "configs/quickstart.py",
             "--set", "model.stem_channels=8", "--set", "model.base_channels=8", "--batch-size", "16",
             "--steps", "2", "--warmup", "0", "--float-twin", "--data", "--json"]
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, PYTHONPATH=str(REPO))  # a few steps of each program
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("train_img_per_s", "eval_img_per_s", "compile_s", "input_img_per_s"):
    assert report[key] > 0, key
  assert report["peak_memory_bytes"] is None  # the CPU backend reports none
  assert (report["device_count"], report["dtype"], report["batch_size"]) == (1, "float32", 16)
  assert report["device"] == "cpu (cpu)"
  assert report["binary_over_float_train"] == pytest.approx(
      report["train_step_s"] / report["float_twin"]["train_step_s"])
  assert "float twin (binary_type=(False, False))" in result.stdout
