"""Real-valued ResNet-18 (torchvision's layout and recipe): Real-to-Binary's first teacher."""
from bnn_jax.config import real_resnet


def get_config():
  return real_resnet(18)
