"""Tiny models, real data, runs and configs shared by the engine tests."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import train_step


class TinyCNN(nn.Module):
  """conv-BN-relu twice, pooled embedding, dense logits; NHWC input."""

  width: int = 8
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)

    def bn(h):
      # BatchNorm in float32 (Flax's mixed-dtype BatchNorm trips strict
      # dtype promotion), the rest in the compute dtype.
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
          h.astype(jnp.float32))
      return h.astype(self.dtype)

    h1 = nn.relu(bn(nn.Conv(self.width, (3, 3), use_bias=False,
                            dtype=self.dtype)(x)))
    h2 = nn.relu(bn(nn.Conv(2 * self.width, (3, 3), strides=2,
                            use_bias=False, dtype=self.dtype)(h1)))
    embedding = jnp.mean(h2, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(embedding)
    features = {"stage1": h1, "stage2": h2, "embedding": embedding}
    return logits.astype(jnp.float32), features


class TinyMLP(nn.Module):
  """A BatchNorm-free MLP (exact gradient-accumulation checks)."""

  width: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    h = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(h), {"embedding": h}


@functools.lru_cache(maxsize=None)
def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 real 8x8 digits as ``[N, 8, 8, 1]`` in [0, 1]."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  return images, data.target.astype(np.int32)


def digit_batches(batch_size: int, num_batches: int, seed: int = 0):
  """Deterministic batches of real digits as dicts of arrays."""
  images, labels = digits()
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_batches):
    idx = rng.choice(len(images), batch_size, replace=False)
    out.append({"image": jnp.asarray(images[idx]),
                "label": jnp.asarray(labels[idx])})
  return out


@functools.lru_cache(maxsize=None)
def trained_teachers(k: int, first_seed: int, width: int = 8):
  """K ``TinyCNN(width)`` teachers trained briefly on real digits.

  Labels only, Adam 1e-2, 30 batches of 64 each; teacher ``i`` is drawn and
  fed with seed ``first_seed + i``. Returns the lists ``(params, states)``.
  """
  # Imported here: the models and batches above need nothing of jaxkd.
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jaxkd import objective  # pylint: disable=g-import-not-at-top
  from jaxkd import train_step  # pylint: disable=g-import-not-at-top
  from jaxkd.models import from_linen  # pylint: disable=g-import-not-at-top

  spec = train_step.Distillation(
      student=from_linen(TinyCNN(width=width), name="teacher"),
      objective=[objective.LabelTerm()], optimizer=optax.adam(1e-2),
  )
  step = train_step.make_train_step(spec)
  params, states = [], []
  for i in range(k):
    batches = digit_batches(64, 30, seed=first_seed + i)
    state = spec.init(jax.random.key(i), batches[0])
    for batch in batches:
      state, _ = step(state, batch)
    params.append(state.params["student"])
    states.append(state.model_state["student"])
  return params, states


def run_steps(spec, batches, teacher_variables=(), key=0, **init_kwargs):
  """``spec.init`` on the first batch, then one train step per batch.

  Returns the last state and the metrics of every step, on the host.
  """
  state = spec.init(jax.random.key(key), batches[0], teacher_variables,
                    **init_kwargs)
  step = train_step.make_train_step(spec, donate=False)
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(jax.tree.map(np.asarray, metrics))
  return state, history


def shrink_config(config, data_dir, **overrides):
  """An experiment config cut to one step per epoch on one device.

  One epoch of one step (the teachers' too), no progress bar, and a test
  split of one evaluation batch of 8 (for a ``:runlocal`` config, whose test
  split is ``"<split>[:N]"``). ``overrides`` are dotted keys
  (``**{"teacher.load": "x"}``) set last. Returns ``config``, changed.
  """
  config.data_dir = str(data_dir)
  config.steps_per_epoch = 1
  config.num_epochs = 1
  config.teacher.num_epochs = 1
  config.progress_bar = False
  config.data_parallel = False
  config.test_split = config.test_split.split("[")[0] + "[:8]"
  config.eval_batch_size = 8
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config
