"""Hyper-parameters of objective terms: constants, schedules, swept values.

A weight or temperature is a float, a ``step -> value`` schedule (optax's,
or ``jaxkd.schedules``') or a :class:`Hyper` read from the state's swept
values. Constants and schedules are checked when a term is built
(:func:`check_hyperparameter`); traced values are checked at every step
(:func:`is_valid`), turning the loss into NaN with a named failure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


ScheduleOrValue = Any  # a float, a `step -> value` schedule or a Hyper

HYPERPARAMETER_KINDS = ("weight", "temperature")
# Steps at which a schedule is checked when its term is built.
_CHECKED_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


@dataclasses.dataclass(frozen=True)
class Hyper:
  """A hyper-parameter read from ``state.hparams[name]`` at every step.

  Use it for a weight or temperature that a vmapped sweep varies across
  students (``jaxkd.sweep``), or that the training loop changes without
  recompiling (an adaptive weight).
  """

  name: str


def resolve(
    value: ScheduleOrValue | Hyper,
    step: jax.Array,
    hparams: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """The value of a constant, a schedule or a :class:`Hyper` at ``step``."""
  if isinstance(value, Hyper):
    if not hparams or value.name not in hparams:
      raise ValueError(
          f"The objective reads the hyper-parameter {value.name!r}, but the"
          f" state has {sorted(hparams or {})}: pass"
          f" `hparams={{{value.name!r}: ...}}` to `Distillation.init`."
      )
    return jnp.asarray(hparams[value.name], jnp.float32)
  if callable(value):
    return jnp.asarray(value(step), jnp.float32)
  return jnp.asarray(value, jnp.float32)


def is_valid(value: jax.Array, kind: str) -> jax.Array:
  """Whether a (traced) hyper-parameter value is usable: a boolean scalar.

  A temperature must be finite and ``> 0``, a weight finite and ``>= 0``.
  """
  value = jnp.asarray(value, jnp.float32)
  if kind == "temperature":
    return jnp.all(jnp.isfinite(value) & (value > 0))
  return jnp.all(jnp.isfinite(value) & (value >= 0))


def check_hyperparameter(owner: str, name: str, value: Any, kind: str) -> None:
  """Raises ``ValueError`` for an invalid constant or schedule.

  Constants are checked as they are; a schedule (a callable of the step) is
  evaluated at steps 0, 1, 10, ..., 10**6 and every value checked. A
  :class:`Hyper` is read from the state at run time and checked there.
  """
  if kind not in HYPERPARAMETER_KINDS:
    raise ValueError(f"Unknown hyper-parameter kind {kind!r}.")
  if value is None or isinstance(value, (Hyper, jax.core.Tracer)):
    return  # Checked at run time, by the engine.
  need = "> 0" if kind == "temperature" else ">= 0"
  if callable(value):
    for step in _CHECKED_STEPS:
      at = jax.device_get(value(jnp.asarray(step, jnp.int32)))
      if not bool(is_valid(at, kind)):
        raise ValueError(
            f"`{name}` of {owner} is a schedule whose value at step {step} is"
            f" {float(jnp.asarray(at)):g}; a {kind} must be finite and {need}."
        )
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, float, jax.Array, jnp.ndarray, jnp.generic)
  ):
    raise TypeError(
        f"`{name}` of {owner} must be a number, a schedule (a callable of"
        f" the step) or a Hyper, got {type(value).__name__} {value!r}."
    )
  constant = np.asarray(value, np.float64)
  ok = np.isfinite(constant) & (
      constant > 0 if kind == "temperature" else constant >= 0)
  if not np.all(ok):
    raise ValueError(
        f"`{name}` of {owner} must be finite and {need}, got {value!r}."
    )
