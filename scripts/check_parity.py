"""Numerical parity of bnn_jax with the original PyTorch implementation.

    python scripts/check_parity.py ../shared/reference/parity/irnet_r18.npz [more.npz ...]

Prints the norm-wise relative error of eval logits, train-mode logits, loss,
BatchNorm running means and variances after the train step and the worst parameter gradient;
exits 1 when any fixture is outside tolerance.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnn_jax.parity import check_fixture, report_fixtures  # noqa: E402


def main(paths):
  if not paths:
    sys.exit(__doc__)
  sys.exit(0 if report_fixtures(paths, check_fixture) else 1)


if __name__ == "__main__":
  main(sys.argv[1:])
