"""Quickstart: a fully binary ReActNet-style ResNet on scikit-learn's digits, offline, on a CPU.

    python -m bnn_jax.train --config configs/quickstart.py --workdir /tmp/bnn-quickstart
"""
from bnn_jax.config import default_config, digits


def get_config():
  c = default_config()
  c.model.update(backbone="ResArch", arch="ReActNet-18", num_classes=10, stem_channels=16,
                 base_channels=16, strides=(1, 2, 2, 1), cifar_stem=True, binary_type=(True, True))
  c.dataset = digits()
  c.optimizer.update(name="adam", lr=2e-3, weight_decay=0.0)
  c.schedule.update(name="cosine", by_epoch=False)
  c.train.update(epochs=30, batch_size=64, eval_batch_size=360, log_every=5, eval_every_epochs=3,
                 checkpoint_every_epochs=3, max_to_keep=2)
  return c
