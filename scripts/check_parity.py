"""Numerical parity of bnn_jax with the original PyTorch implementation, HCEBNN's official code
and larq-zoo (a fixture whose JSON names a larq-zoo factory; its .h5 is converted).

    python scripts/check_parity.py ../shared/reference/parity/irnet_r18.npz [more.npz ...]
    python scripts/check_parity.py ../shared/reference/larq/*.npz

Prints the norm-wise relative error of eval logits, train-mode logits, loss,
BatchNorm running means and variances after the train step and the worst parameter gradient;
exits 1 when any fixture is outside tolerance.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnn_jax import cli  # noqa: E402
from bnn_jax.parity import check_fixture, read_fixture, report_fixtures  # noqa: E402
from bnn_jax.parity_larq import check_larq_fixture, is_larq_fixture  # noqa: E402


def check(path):
  """The check that fits the fixture: larq-zoo's, or the PyTorch codebases'."""
  return (check_larq_fixture if is_larq_fixture(read_fixture(path)[0]) else check_fixture)(path)


def main(paths):
  if not paths:
    sys.exit(__doc__)
  sys.exit(0 if report_fixtures(paths, check) else 1)


if __name__ == "__main__":
  cli.script(lambda: main(sys.argv[1:]))
