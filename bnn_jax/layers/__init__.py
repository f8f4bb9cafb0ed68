"""The layers of every model, one module per concern.

Module names follow the original PyTorch modules and leaf names follow Flax (``kernel``,
``scale``, ``bias``) or the original (``weight`` of PReLU, ``alpha``/``beta``/``gamma``), so
converted checkpoints map leaf by leaf. All modules take NHWC inputs.

- :mod:`~bnn_jax.layers.conv`: binary convolutions and the convolution every layer runs
- :mod:`~bnn_jax.layers.experts`: HCEBNN's expert binary convolution
- :mod:`~bnn_jax.layers.norm`: BatchNorm (ghost batches, closed-form backward)
- :mod:`~bnn_jax.layers.pooling`: pooling with PyTorch's semantics
- :mod:`~bnn_jax.layers.activations`: activations and learnable shifts, slopes and scales
- :mod:`~bnn_jax.layers.cpu_kernels`: convolution kernels chosen for XLA:CPU
"""
from bnn_jax.layers.activations import (ACTIVATIONS, AttentionScale, LearnableBias, LearnableScale,
                                        PReLU, RPReLU, hardtanh, make_activation)
from bnn_jax.layers.conv import BinaryConv, conv, conv2d, conv_init, per_sample_conv2d
from bnn_jax.layers.cpu_kernels import (STORED_INPUT_MIN_SIZE, cpu_conv2d, materialized,
                                        plain_conv)
from bnn_jax.layers.experts import (GATES, SOWN, ChannelScale, ExpertBinaryConv, chosen_experts,
                                    expert_choices, select_experts, torch_default_bias,
                                    torch_default_init)
from bnn_jax.layers.norm import (BatchNorm, batch_norm, ghost_groups, normalize_batch,
                                 normalized_affine)
from bnn_jax.layers.pooling import avg_pool_ceil, max_pool_3x3_s2

__all__ = [
    "ACTIVATIONS",
    "AttentionScale",
    "BatchNorm",
    "BinaryConv",
    "ChannelScale",
    "ExpertBinaryConv",
    "GATES",
    "LearnableBias",
    "LearnableScale",
    "PReLU",
    "RPReLU",
    "SOWN",
    "STORED_INPUT_MIN_SIZE",
    "avg_pool_ceil",
    "batch_norm",
    "chosen_experts",
    "conv",
    "conv2d",
    "conv_init",
    "cpu_conv2d",
    "expert_choices",
    "ghost_groups",
    "hardtanh",
    "make_activation",
    "materialized",
    "max_pool_3x3_s2",
    "normalize_batch",
    "normalized_affine",
    "per_sample_conv2d",
    "plain_conv",
    "select_experts",
    "torch_default_bias",
    "torch_default_init",
]
