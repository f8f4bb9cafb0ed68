"""Numerical parity of bnn_jax with the original PyTorch implementation.

    python scripts/check_parity.py ../shared/reference/parity/irnet_r18.npz [more.npz ...]

Prints the norm-wise relative error of eval logits, train-mode logits, loss,
BatchNorm running means after the train step and the worst parameter gradient;
exits 1 when any fixture is outside tolerance.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnn_jax.parity import check_fixture  # noqa: E402


def main(paths):
  if not paths:
    sys.exit(__doc__)
  failed = []
  for path in paths:
    report = check_fixture(path)
    print(f"{os.path.basename(path)}: {'PASS' if report.passed else 'FAIL'}")
    for line in report.lines():
      print("  " + line)
    if not report.passed:
      failed.append(path)
  if failed:
    print(f"{len(failed)} of {len(paths)} fixture(s) outside tolerance: {failed}")
    sys.exit(1)


if __name__ == "__main__":
  main(sys.argv[1:])
