"""bnn_jax: binary neural networks (1-bit weights and activations) in JAX/Flax."""
import os

# TensorFlow only feeds data (tf.data, TensorBoard); its C++ start-up log lines are noise here.
# Set before anything imports it; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
