"""Losses: cross-entropy, the KD distribution loss, attention transfer; top-k accuracy counts.

Every loss here is per example (shape ``(batch,)``), so a weighted sum of them is
the per-example objective and its batch mean is what the train step minimises.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def distribution_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float = 1.0) -> jax.Array:
  """ReActNet's distributional loss: −Σ softmax(teacher/T) · log_softmax(student/T), times T².

  No gradient reaches the teacher. T = 1 is the original; T² keeps the gradient's
  scale independent of T (Hinton et al.).
  """
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return -jnp.sum(teacher * student, axis=-1) * temperature ** 2


KD_LOSSES = ("cross_entropy", "keras_kl")
KERAS_EPSILON = 1e-7  # Keras' backend.epsilon(), which its KL divergence clips probabilities to


def keras_kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                        temperature: float = 1.0) -> jax.Array:
  """larq-zoo's output matching: Keras' KL divergence Σ p·log(p/q) of the teacher's p =
  softmax(teacher/T) from the student's q = softmax(student/T), both clipped to [1e-7, 1] as
  Keras', times T². It differs from :func:`distribution_loss` by the teacher's entropy (a
  constant) and, through the clip, no gradient from a student probability below 1e-7."""
  teacher = jnp.clip(jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1),
                     KERAS_EPSILON, 1.0)
  student = jnp.clip(jax.nn.softmax(student_logits / temperature, axis=-1), KERAS_EPSILON, 1.0)
  return jnp.sum(teacher * jnp.log(teacher / student), axis=-1) * temperature ** 2


ATTENTION_NORMS = ("max", "max_tf", "l2")


def attention_map(features: jax.Array, norm: str = "max") -> jax.Array:
  """Q = mean over channels of A², flattened per example and divided by its maximum
  (``norm="max"``, Real-to-Binary) or by its L2 norm (``"l2"``, HCEBNN's ``F.normalize``;
  at least 1e-12 as there). NHWC in.

  With ``"max"`` the maximum's gradient goes to its first position, as PyTorch's ``max(dim)``;
  ``"max_tf"`` shares it equally among tied maxima, as TensorFlow's ``reduce_max`` (larq-zoo's
  attention matching). The two differ only where a map's maximum is tied.
  """
  features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  q = jnp.mean(jnp.square(features), axis=-1).reshape(features.shape[0], -1)
  if norm == "l2":
    return q / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(q), axis=-1, keepdims=True)), 1e-12)
  if norm == "max_tf":
    return q / jnp.max(q, axis=-1, keepdims=True)
  peak = jnp.take_along_axis(q, jnp.argmax(q, axis=-1)[:, None], axis=-1)
  return q / peak


def attention_transfer(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                       norm: str = "max") -> jax.Array:
  """The attention loss per example: the MSE between the student's and the teacher's attention
  maps (:func:`attention_map`), averaged over the compared feature maps (teacher side
  stop-gradient). Its batch mean is Real-to-Binary's mean over blocks and examples; times the
  number of maps, HCEBNN's sum over stages of the mean over examples and positions."""
  losses = [jnp.mean(jnp.square(attention_map(student[name], norm)
                                - jax.lax.stop_gradient(attention_map(teacher[name], norm))), axis=-1)
            for name in student]
  return sum(losses) / len(losses)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits (ties broken against the label); never
  for a label outside the classes or a NaN logit of the label, which no comparison ranks."""
  valid = (labels >= 0) & (labels < logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)
  ranked = jnp.sum(logits > label_logit, axis=-1) < k
  return (ranked & valid & ~jnp.isnan(label_logit[:, 0])).astype(jnp.float32)
