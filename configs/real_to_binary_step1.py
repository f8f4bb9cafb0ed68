"""Real-to-Binary Net, stage 1: binary activations, real weights."""
from bnn_jax.config import WORKDIRS, default_config


def get_config(workdirs=WORKDIRS):
  c = default_config()
  c.model.update(backbone="ResArch", arch="Real2Bi", stem_act="prelu", binary_type=(True, False),
                 bn_group_size=32)
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0)
  c.schedule.update(name="step", milestones=(40, 60, 70), warmup="linear", warmup_steps=25025,
                    warmup_ratio=0.1)
  c.train.update(epochs=75, batch_size=256)
  # Real-to-Binary's objective: CE + 3·KD + 30·attention transfer at every block output,
  # from the stage before.
  c.loss.update(ce_weight=1.0, kd_weight=3.0, at_weight=30.0)
  c.teacher.model.update(arch="Real2BiFP", stem_act="prelu", binary_type=(False, False), bn_group_size=32)
  c.teacher.batchnorm = "batch"  # the original never puts its teacher in eval mode
  c.teacher.checkpoint = f"{workdirs}/real_to_binary_fp"
  return c
