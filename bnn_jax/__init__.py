"""bnn_jax: binary neural networks (1-bit weights and activations) in JAX/Flax."""

__version__ = "0.1.0"
