"""Fully connected ReLU networks: the MNIST models of Hinton et al. (2015).

``hinton_teacher`` is the 784-1200-1200-10 network of the distillation paper,
regularised with dropout as in Hinton et al. (2012): 20 % on the input pixels
and 50 % on the hidden units. ``hinton_student`` is the unregularised
784-800-800-10 network. The input may have any shape per example (an MNIST
image ``[batch, 28, 28, 1]`` or a vector ``[batch, 784]``): it is flattened.

Initialisation: PyTorch's default for ``torch.nn.Linear`` (kernel and bias
uniform on ``±1 / sqrt(fan_in)``).

Reference: Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural
Network <https://arxiv.org/abs/1503.02531>`_, 2015; Hinton, Srivastava,
Krizhevsky, Sutskever and Salakhutdinov, `Improving neural networks by
preventing co-adaptation of feature detectors
<https://arxiv.org/abs/1207.0580>`_, 2012.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any


class MLP(nn.Module):
  """A ReLU multi-layer perceptron with optional dropout.

  Attributes:
    hidden_sizes: Widths of the hidden layers.
    num_classes: Number of output classes.
    dropout_rate: Dropout on every hidden layer's output (training only).
    input_dropout_rate: Dropout on the flattened input (training only).
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      are float32 and the logits are returned in float32.

  ``__call__(x, train)`` takes ``[batch, ...]`` inputs and returns
  ``(logits, features)``: logits ``[batch, num_classes]`` and the features
  ``"stage1"``, ``"stage2"``, ... (each hidden layer's ReLU output, before
  dropout, ``[batch, hidden_sizes[i]]``) and ``"embedding"`` (the last
  hidden layer's output before dropout; the classifier reads it after
  dropout), in the compute dtype. Dropout draws from the ``"dropout"`` RNG
  stream.
  """

  hidden_sizes: Sequence[int]
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    for name, rate in (
        ("dropout_rate", self.dropout_rate),
        ("input_dropout_rate", self.input_dropout_rate),
    ):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"MLP {name} must be in [0, 1), got {rate}.")
    if not self.hidden_sizes:
      raise ValueError("MLP hidden_sizes must hold at least one width.")
    x = jnp.asarray(x)
    if x.ndim < 2:
      raise ValueError(
          f"MLP expects a batch [batch, ...], got shape {tuple(x.shape)}."
      )
    x = _layers.to_compute_dtype(x.reshape(x.shape[0], -1), self.dtype)
    x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
    features = {}
    for layer, width in enumerate(self.hidden_sizes, start=1):
      x = _layers.torch_default_dense(
          width, x, name=f"dense{layer}", dtype=self.dtype
      )(x)
      x = nn.relu(x)
      features[f"stage{layer}"] = x
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    features["embedding"] = features[f"stage{len(self.hidden_sizes)}"]
    logits = _layers.torch_default_dense(
        self.num_classes, x, name="classifier", dtype=self.dtype
    )(x)
    return _layers.to_float32_logits(logits), features


def hinton_teacher(*, num_classes: int, dtype: Dtype = jnp.float32) -> MLP:
  """Hinton et al.'s MNIST teacher: 1200-1200 ReLU, dropout 0.2 / 0.5."""
  return MLP(
      (1200, 1200),
      num_classes=num_classes,
      dropout_rate=0.5,
      input_dropout_rate=0.2,
      dtype=dtype,
  )


def hinton_student(*, num_classes: int, dtype: Dtype = jnp.float32) -> MLP:
  """Hinton et al.'s MNIST student: 800-800 ReLU, no dropout."""
  return MLP((800, 800), num_classes=num_classes, dtype=dtype)
