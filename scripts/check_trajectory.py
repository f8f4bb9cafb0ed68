"""Trajectory parity of bnn_jax with the original PyTorch implementation: a short run of its recipe.

    python scripts/check_trajectory.py ../shared/reference/trajectory/traj_irnet_r18.npz [more.npz ...]

Translates each fixture's recipe (mmcv optimizer, lr_config, EDE, distill) into our config,
trains it with bnn_jax's own train step in float64, one step per recorded batch, and prints
the worst per-step loss error, the worst learning-rate / EDE error, and the error of all final
weights and BatchNorm statistics together (with the worst tensor); exits 1 when any fixture
is outside tolerance.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnn_jax import cli  # noqa: E402
from bnn_jax.parity import report_fixtures  # noqa: E402
from bnn_jax.trajectory import check_trajectory  # noqa: E402


def main(paths):
  if not paths:
    sys.exit(__doc__)
  sys.exit(0 if report_fixtures(paths, check_trajectory) else 1)


if __name__ == "__main__":
  cli.script(lambda: main(sys.argv[1:]))
