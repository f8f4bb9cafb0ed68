"""Real-to-Binary Net (Martinez et al., ICLR 2020), stage 0: the real-valued network (tanh in place of sign)."""
from bnn_jax.config import WORKDIRS, default_config, imagenet, teacher_dir


def get_config(workdirs=WORKDIRS):
  c = default_config()
  c.model.update(backbone="ResArch", arch="Real2BiFP", stem_act="prelu", binary_type=(False, False),
                 bn_group_size=32)
  c.dataset = imagenet(colour_jitter=True)
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0)
  c.schedule.update(name="step", milestones=(40, 60, 70), warmup="linear", warmup_steps=25025,
                    warmup_ratio=0.1)
  c.train.update(epochs=75, batch_size=256)
  # Real-to-Binary's objective: CE + 3·KD + 30·attention transfer at every block output,
  # from the stage before.
  c.loss.update(ce_weight=1.0, kd_weight=3.0, at_weight=30.0)
  c.teacher.model.update(arch="ResNet-18", stem_act="relu", bn_group_size=32)
  c.teacher.batchnorm = "batch"  # the original never puts its teacher in eval mode
  c.teacher.checkpoint = teacher_dir(18, workdirs)
  return c
