"""ReActNet-A (MobileNet layout), step 2 of 2: fully binary, initialised from step 1."""
from bnn_jax.config import WORKDIRS, default_config, imagenet, teacher_dir


def get_config(workdirs=WORKDIRS):
  c = default_config()
  c.model.update(backbone="MobileArch", arch="ReActNet-A", binary_type=(True, True),
                 bn_group_size=64)
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=0.0, norm_decay_mult=0.0)
  c.schedule.update(name="poly", by_epoch=False, min_lr=0.0)
  c.train.update(epochs=256, batch_size=512, load_from=f"{workdirs}/reactnet_a_step1")
  # ReActNet's loss: the distribution of a real ResNet-34 teacher alone (no cross-entropy).
  c.loss.update(only_kd=True, kd_weight=1.0)
  c.dataset = imagenet(resize="pillow")
  # The original's teacher: mmclassification's ResNet-34, left in train mode (BatchNorm on each
  # GPU's batch of 64).
  c.teacher.model.update(arch="ResNet-34", stem_act="relu", bn_group_size=64)
  c.teacher.batchnorm = "batch"
  c.teacher.checkpoint = teacher_dir(34, workdirs)
  return c
