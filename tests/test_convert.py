"""The converter: .pth (weights_only) and .npz state dicts -> an Orbax checkpoint that evaluates as the original."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnn_jax.checkpoint import Checkpoints
from bnn_jax.config import default_config
from bnn_jax.convert import (convert_checkpoint, load_state_dict, model_config_from_original,
                             torch_to_flax)
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment

from conftest import PARITY_DIR, REPO

FIXTURE = "reactnet_r18_step2"


def fixture_config():
  """Our config for the fixture's model (32×32 RGB inputs)."""
  config = default_config()
  original = json.loads((PARITY_DIR / f"{FIXTURE}.json").read_text())
  config.model.update(model_config_from_original(original))
  config.dataset.image_size = 32
  return config


def eval_logits_of_converted(config, workdir):
  experiment = Experiment.from_config(config)
  variables, meta = Checkpoints(workdir, read_only=True).restore_variables(
      experiment.variables_template(), None)
  with np.load(PARITY_DIR / f"{FIXTURE}.npz") as fixture:
    images, expected = fixture["input_nchw"].transpose(0, 2, 3, 1), fixture["logits_eval"]
  logits = jax.jit(lambda v, x: experiment.model.apply(v, x, train=False))(variables, images)
  return logits, expected, meta


def test_pth_checkpoint_converts_to_orbax_and_reproduces_original_logits(shared_dir, tmp_path):
  torch = pytest.importorskip("torch")
  state_dict = load_state_dict(str(PARITY_DIR / f"{FIXTURE}.npz"))
  # mmcv's layout: {"meta": ..., "state_dict": ...}, saved by DDP with a "module." prefix.
  torch.save({"meta": {"epoch": 256}, "state_dict": {
      f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}}, tmp_path / "model.pth")
  config = fixture_config()
  convert_checkpoint(config, str(tmp_path / "model.pth"), str(tmp_path / "converted"))
  logits, expected, meta = eval_logits_of_converted(config, str(tmp_path / "converted"))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert meta["step"] == 0 and meta["converted_from"].endswith("model.pth")


class Payload:
  """What a malicious checkpoint could carry: an arbitrary object to unpickle."""


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, tmp_path / "evil.pth")
  with pytest.raises(ConfigError, match="weights_only"):
    load_state_dict(str(tmp_path / "evil.pth"))


def test_convert_cli_on_npz(shared_dir, tmp_path):
  original = json.loads((PARITY_DIR / f"{FIXTURE}.json").read_text())
  config_file = tmp_path / "fixture_config.py"
  config_file.write_text(
      "from bnn_jax.config import default_config\n"
      "def get_config():\n"
      "  c = default_config()\n"
      f"  c.model.update(backbone='ResArch', arch='ReActNet-18', stem_channels=8, base_channels=8,\n"
      f"                 avg_down=True, num_classes={original['num_classes']})\n"
      "  c.dataset.image_size = 32\n"
      "  return c\n")
  result = subprocess.run(
      [sys.executable, "-m", "bnn_jax.convert", f"--config={config_file}",
       f"--torch-checkpoint={PARITY_DIR / FIXTURE}.npz", f"--out={tmp_path / 'converted'}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "converted" in result.stdout
  logits, expected, _ = eval_logits_of_converted(fixture_config(), str(tmp_path / "converted"))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  # A state dict of another model: one line naming the keys, exit status 1.
  config_file.write_text(config_file.read_text().replace("base_channels=8", "base_channels=16"))
  result = subprocess.run(
      [sys.executable, "-m", "bnn_jax.convert", f"--config={config_file}",
       f"--torch-checkpoint={PARITY_DIR / FIXTURE}.npz", f"--out={tmp_path / 'other'}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 1 and "error: state dict does not fit the model" in result.stderr
  assert "head.fc.weight (checkpoint (10, 64), model expects (10, 128))" in result.stderr


def mmcls_resnet18_state_dict(width=8, classes=10, seed=0):
  """An mmclassification ResNet-18 checkpoint's state dict (the original's KD teachers), keyed as
  mmcls writes it: ``backbone.…`` (downsample as ``.0`` conv, ``.1`` BN) and ``head.fc.…``."""
  rng = np.random.default_rng(seed)
  state = {}

  def bn(prefix, channels):
    for name in ("weight", "bias", "running_mean"):
      state[f"{prefix}.{name}"] = rng.standard_normal(channels).astype(np.float32)
    state[f"{prefix}.running_var"] = rng.uniform(0.5, 2, channels).astype(np.float32)
    state[f"{prefix}.num_batches_tracked"] = np.array(7)

  def conv(key, out, inp, k):
    state[key] = rng.standard_normal((out, inp, k, k)).astype(np.float32)

  conv("backbone.conv1.weight", width, 3, 7)
  bn("backbone.bn1", width)
  inp = width
  for stage in range(4):
    out = width * 2 ** stage
    for block in range(2):
      prefix = f"backbone.layer{stage + 1}.{block}"
      conv(f"{prefix}.conv1.weight", out, inp if block == 0 else out, 3)
      bn(f"{prefix}.bn1", out)
      conv(f"{prefix}.conv2.weight", out, out, 3)
      bn(f"{prefix}.bn2", out)
      if block == 0 and stage > 0:
        conv(f"{prefix}.downsample.0.weight", out, inp, 1)
        bn(f"{prefix}.downsample.1", out)
    inp = out
  state["head.fc.weight"] = rng.standard_normal((classes, inp)).astype(np.float32)
  state["head.fc.bias"] = rng.standard_normal(classes).astype(np.float32)
  return state


def test_mmclassification_resnet_checkpoint_converts_as_a_teacher(tmp_path):
  torch = pytest.importorskip("torch")
  state = mmcls_resnet18_state_dict()
  torch.save({"meta": {"epoch": 100}, "state_dict": {k: torch.from_numpy(np.asarray(v))
                                                     for k, v in state.items()}}, tmp_path / "r18.pth")
  config = default_config()
  config.model.update(arch="ResNet-18", stem_act="relu", stem_channels=8, base_channels=8,
                      num_classes=10)
  config.dataset.image_size = 32
  variables = torch_to_flax(load_state_dict(str(tmp_path / "r18.pth")),
                            Experiment.from_config(config).variables_template())
  params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  np.testing.assert_array_equal(params["layer2.0"]["downsample"]["0"]["kernel"],
                                state["backbone.layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["layer4.1"]["bn2"]["var"], state["backbone.layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(variables["params"]["head"]["fc"]["kernel"], state["head.fc.weight"].T)
