"""ReActNet ResNet-18, step 1 of 2: binary activations, real weights."""
from bnn_jax.config import TORCHVISION_RESNET34, default_config


def get_config():
  c = default_config()
  c.model.update(backbone="ResArch", arch="ReActNet-18", avg_down=True, binary_type=(True, False))
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0)
  c.schedule.update(name="poly", by_epoch=False, min_lr=0.0)
  c.train.update(epochs=256, batch_size=512)
  # ReActNet's loss: the distribution of a real ResNet-34 teacher alone (no cross-entropy).
  c.loss.update(only_kd=True, kd_weight=1.0)
  c.teacher.model.update(arch="ResNet-34", stem_act="relu")
  c.teacher.checkpoint = TORCHVISION_RESNET34
  return c
