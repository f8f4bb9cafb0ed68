"""Real-valued ResNet-34 (torchvision's layout and recipe): ReActNet's teacher."""
from bnn_jax.config import real_resnet


def get_config():
  return real_resnet(34)
