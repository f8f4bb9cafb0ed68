"""Real-to-Binary's strong baseline, step 1 of 2: binary activations, real weights."""
from bnn_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(backbone="ResArch", arch="StrongBaseline", stem_act="prelu", binary_type=(True, False),
                 bn_group_size=32)
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0)
  c.schedule.update(name="step", milestones=(40, 60, 70), warmup="linear", warmup_steps=25025,
                    warmup_ratio=0.1)
  c.train.update(epochs=75, batch_size=256)
  return c
