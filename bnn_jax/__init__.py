"""bnn_jax: binary neural networks (1-bit weights and activations) in JAX/Flax."""
import os

# TensorFlow only feeds data (tf.data, TensorBoard); its C++ start-up log lines are noise here.
# Set before anything imports it; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA:CPU runs convolutions through YNNPACK by default; its own (Eigen) kernels compute ResNet-18's
# 3x3 weight gradients 1.4-2.9x faster, forward and input gradients up to 1.6x (README, "Speed"),
# so YNNPACK keeps only dots and reductions (without it, reductions get slower).
# XLA reads XLA_FLAGS when JAX first uses a device, so this holds when bnn_jax is imported before
# any computation; a user's own setting of the flag wins.
CPU_LIBRARY_FUSIONS = ("--xla_cpu_experimental_ynn_fusion_type="
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
if CPU_LIBRARY_FUSIONS.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_LIBRARY_FUSIONS}".strip()

__version__ = "0.1.0"
