"""ReActNet ResNet-18, step 1 of 2: binary activations, real weights."""
from bnn_jax.config import WORKDIRS, default_config, imagenet, teacher_dir


def get_config(workdirs=WORKDIRS):
  c = default_config()
  c.model.update(backbone="ResArch", arch="ReActNet-18", avg_down=True, binary_type=(True, False),
                 bn_group_size=64)
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0)
  # Poly decay per epoch: step 2's config says by_epoch=True, and the logged run of step 1 decayed
  # per epoch too (its config file says by_epoch=False; seed_logs.json is what ran).
  c.schedule.update(name="poly", by_epoch=True, min_lr=0.0)
  c.train.update(epochs=256, batch_size=512)
  # ReActNet's loss: the distribution of a real ResNet-34 teacher alone (no cross-entropy).
  c.loss.update(only_kd=True, kd_weight=1.0)
  c.dataset = imagenet(resize="pillow")
  # The original's teacher: mmclassification's ResNet-34, left in train mode (BatchNorm on each
  # GPU's batch of 64).
  c.teacher.model.update(arch="ResNet-34", stem_act="relu", bn_group_size=64)
  c.teacher.batchnorm = "batch"
  c.teacher.checkpoint = teacher_dir(34, workdirs)
  return c
