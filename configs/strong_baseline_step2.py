"""Real-to-Binary's strong baseline, step 2 of 2: fully binary, from step 1."""
from bnn_jax.config import WORKDIRS, default_config


def get_config(workdirs=WORKDIRS):
  c = default_config()
  c.model.update(backbone="ResArch", arch="StrongBaseline", stem_act="prelu", binary_type=(True, True),
                 bn_group_size=32)
  c.optimizer.update(name="adam", lr=2e-4, weight_decay=0.0, norm_decay_mult=0.0)
  c.schedule.update(name="step", milestones=(40, 60, 70))
  c.train.update(epochs=75, batch_size=256, load_from=f"{workdirs}/strong_baseline_step1")
  return c
