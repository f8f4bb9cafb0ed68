"""larq-zoo's models: parity with larq-zoo's own fixtures, full-size counts, weight files."""
import json

import jax
import numpy as np
import pytest

from bnn_jax.config import load_config
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.parity_larq import check_larq_fixture
from conftest import SHARED

LARQ_DIR = SHARED / "reference" / "larq"
COUNTS = LARQ_DIR / "larq_zoo_counts.json"
FIXTURES = sorted(p.name for p in LARQ_DIR.glob("*.npz")) if LARQ_DIR.exists() else []
COUNT_NAMES = sorted(json.loads(COUNTS.read_text())) if COUNTS.exists() else []


@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_larq_zoo(fixture):
  report = check_larq_fixture(str(LARQ_DIR / fixture))
  assert report.passed, "\n".join(report.lines())


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", COUNT_NAMES)
def test_full_size_parameter_counts(name):
  """Trainable = our params; non-trainable = BatchNorm statistics plus fixed kernels (QuickNet's
  blur pool), as Keras' count_params() counts them."""
  expected = json.loads(COUNTS.read_text())[name]
  model = build_model(load_config(f"larq_zoo:{name}").model)
  variables = abstract_variables(model, (1, 224, 224, 3))
  assert _count(variables["params"]) == expected["params_trainable"]
  from bnn_jax.keras_weights import weighted_layers
  fixed = sum(np.prod(layer.constants[n].shape) for layer in weighted_layers(model, (1, 224, 224, 3))
              for n in layer.constants)
  assert _count(variables["batch_stats"]) + fixed == expected["params_non_trainable"]
