"""IR-Net's Error Decay Estimator as an optax-style schedule: step -> EDE(k, t).

t = t_min · 10^(e / E · log10(t_max / t_min)),  k = max(1 / t, 1),
with e the current epoch (0-based, as the original's before-epoch hook) and E
the epochs EDE spans. The values are traced into the train step, so they change
every epoch without recompiling.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from bnn_jax.binarize import EDE


def ede_schedule(total_epochs: int, steps_per_epoch: int, t_min: float = 0.1,
                 t_max: float = 10.0) -> Callable[[jnp.ndarray], EDE]:
  """The EDE values to use at optimizer step ``step``."""
  exponent = math.log10(t_max / t_min)

  def schedule(step) -> EDE:
    epoch = jnp.asarray(step) // steps_per_epoch
    t = t_min * 10.0 ** (epoch / total_epochs * exponent)
    t = jnp.asarray(t, jnp.result_type(float))  # float32, or float64 under jax_enable_x64
    return EDE(jnp.maximum(1.0 / t, 1.0), t)

  return schedule
