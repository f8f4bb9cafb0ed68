"""Bi-Real Net ResNet-18 on ImageNet (Liu et al., ECCV 2018), the original's recipe:
8 GPUs × 64 images (BatchNorm over each GPU's 64), Pillow resizing."""
from bnn_jax.config import default_config, imagenet


def get_config():
  c = default_config()
  c.model.update(backbone="ResArch", arch="BiRealNet-18", avg_down=True, bn_group_size=64)
  c.dataset = imagenet(resize="pillow")
  c.optimizer.update(name="adam", lr=1e-3, weight_decay=0.0)
  c.schedule.update(name="poly", by_epoch=False, min_lr=0.0)
  c.train.update(epochs=256, batch_size=512)
  return c
