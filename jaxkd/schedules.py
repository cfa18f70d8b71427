"""What optax's schedules lack: an adaptive weight and a temperature grid.

Temperatures and loss weights that follow a fixed schedule are optax
schedules, passed wherever a term takes a weight or a temperature (the
engine checks them when the term is built, at steps 0, 1, 10, ..., 10**6)::

  optax.constant_schedule(4.0)
  optax.linear_schedule(8.0, 2.0, transition_steps=1000)     # anneal
  optax.linear_schedule(0.0, 1.0, transition_steps=20)       # DKD's warm-up
  optax.cosine_decay_schedule(8.0, 1000, alpha=2.0 / 8.0)    # 8 -> 2
  optax.exponential_decay(4.0, 1000, 0.5, staircase=True, end_value=1.0)

This module adds what optax does not have:

* :class:`AdaptiveAlpha`, a controller that moves the soft-target weight when
  the validation metric stops improving (a state machine of evaluation
  results, not a function of the step);
* :func:`temperature_grid_loss`, the KD loss at several temperatures in one
  vmapped call.

This module imports nothing from the rest of :mod:`jaxkd`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

__all__ = ["AdaptiveAlpha", "AdaptiveAlphaState", "temperature_grid_loss"]

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Any
# Same shape as ``optax.Schedule``: a count in, a scalar out.
Schedule = Callable[[ArrayLike], Array]


# Hyper-parameter checks. They run once, when a schedule is built, on Python
# values; they are written here rather than imported so that this module
# depends on nothing else in jaxkd.
def _as_real(name: str, value: Any) -> float:
  """``value`` as a finite Python float, or a ``TypeError``/``ValueError``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)
  ):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  try:
    result = float(value)
  except TypeError:  # A traced value or an array of several elements.
    raise TypeError(
        f"`{name}` must be a concrete real number (a hyper-parameter fixed"
        f" when the schedule is built), got {value!r}."
    ) from None
  if not math.isfinite(result):
    raise ValueError(f"`{name}` must be finite, got {value!r}.")
  return result


def _as_count(name: str, value: Any, *, minimum: int) -> int:
  """``value`` as a Python int ``>= minimum``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral, np.integer)
  ):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  if value < minimum:
    relation = "> 0" if minimum == 1 else f">= {minimum}"
    raise ValueError(f"`{name}` must be {relation}, got {value!r}.")
  return int(value)


class AdaptiveAlphaState(NamedTuple):
  """State of :class:`AdaptiveAlpha` (a pytree of scalar arrays).

  Attributes:
    alpha: The current soft-target weight, float32.
    best_metric: The best validation metric seen so far, float32; ``-inf``
      before the first evaluation.
    stall_count: Evaluations without improvement since the last improvement
      or the last move of ``alpha``, int32.
  """

  alpha: Array
  best_metric: Array
  stall_count: Array


_DIRECTIONS = ("hard", "soft")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveAlpha:
  r"""Moves the soft-target weight when the validation metric stops improving.

  ``alpha`` is the weight of the soft (teacher) term in a loss such as
  ``(1 - alpha) * hard + alpha * soft``. The controller holds only
  hyper-parameters; its state is an :class:`AdaptiveAlphaState` that the
  caller carries, in the style of an optax ``GradientTransformation``:
  :meth:`init` builds the state and :meth:`update` is a pure, jit-safe
  function of ``(state, validation_metric)``.

  **The rule.** Call :meth:`update` after each evaluation with a metric for
  which higher is better (accuracy, or the negated loss). Let :math:`m` be the
  metric, :math:`b` the best metric so far (``-inf`` at first) and :math:`c`
  the stall count.

  1. *Improvement* if :math:`m > b + \delta` (``min_delta``): set
     :math:`b \leftarrow m`, :math:`c \leftarrow 0`; ``alpha`` is unchanged.
  2. Otherwise :math:`c \leftarrow c + 1`, and ``alpha`` moves if the metric
     has stalled (:math:`c \geq` ``patience``) or dropped
     (:math:`m < b -` ``drop_tolerance``):
     ``alpha <- clip(alpha -/+ step_size, min_alpha, max_alpha)`` (minus for
     ``direction="hard"``, towards the hard labels; plus for ``"soft"``,
     towards the teacher) and :math:`c \leftarrow 0`. :math:`b` is kept.

  With the default ``drop_tolerance=0`` any metric below the best moves
  ``alpha`` at once and ``patience`` counts plateaus (metrics within
  ``min_delta`` above the best); ``drop_tolerance=float("inf")`` turns off the
  immediate move and leaves only ``patience``. A NaN metric counts as a
  stall.

  Attributes:
    initial_alpha: ``alpha`` before the first update, in
      ``[min_alpha, max_alpha]``.
    patience: Number of evaluations without improvement before ``alpha``
      moves, a positive int.
    step_size: How far ``alpha`` moves each time, ``> 0``.
    min_alpha: Lower bound of ``alpha``, in ``[0, 1]``.
    max_alpha: Upper bound of ``alpha``, in ``[min_alpha, 1]``.
    min_delta: Margin by which the metric must beat the best to count as an
      improvement, ``>= 0``.
    drop_tolerance: Margin below the best beyond which a metric counts as a
      drop and moves ``alpha`` at once, ``>= 0`` (``inf`` allowed).
    direction: ``"hard"`` (decrease ``alpha``) or ``"soft"`` (increase it).

  Examples:
    >>> import jax
    >>> from jaxkd import schedules
    >>> controller = schedules.AdaptiveAlpha(initial_alpha=0.5, patience=2)
    >>> update = jax.jit(controller.update)
    >>> state = controller.init()
    >>> alphas = []
    >>> for accuracy in [0.70, 0.75, 0.75, 0.75, 0.72]:
    ...   state, alpha = update(state, accuracy)
    ...   alphas.append(f"{alpha:.2f}")
    >>> print(" ".join(alphas))
    0.50 0.50 0.50 0.40 0.30

  .. versionadded:: 0.1.0
  """

  initial_alpha: float = 0.5
  patience: int = 2
  step_size: float = 0.1
  min_alpha: float = 0.0
  max_alpha: float = 1.0
  min_delta: float = 0.0
  drop_tolerance: float = 0.0
  direction: str = "hard"

  def __post_init__(self):
    initial_alpha = _as_real("initial_alpha", self.initial_alpha)
    _as_count("patience", self.patience, minimum=1)
    step_size = _as_real("step_size", self.step_size)
    min_alpha = _as_real("min_alpha", self.min_alpha)
    max_alpha = _as_real("max_alpha", self.max_alpha)
    min_delta = _as_real("min_delta", self.min_delta)
    if isinstance(self.drop_tolerance, (bool, np.bool_)) or not isinstance(
        self.drop_tolerance, numbers.Real
    ):
      raise TypeError(
          f"`drop_tolerance` must be a real number, got"
          f" {self.drop_tolerance!r}."
      )
    if step_size <= 0.0:
      raise ValueError(f"`step_size` must be > 0, got {self.step_size!r}.")
    if not 0.0 <= min_alpha <= 1.0:
      raise ValueError(f"`min_alpha` must lie in [0, 1], got {min_alpha!r}.")
    if not min_alpha <= max_alpha <= 1.0:
      raise ValueError(
          f"`max_alpha` must lie in [min_alpha, 1] = [{min_alpha!r}, 1], got"
          f" {max_alpha!r}."
      )
    if not min_alpha <= initial_alpha <= max_alpha:
      raise ValueError(
          f"`initial_alpha` must lie in [min_alpha, max_alpha] ="
          f" [{min_alpha!r}, {max_alpha!r}], got {initial_alpha!r}."
      )
    if min_delta < 0.0:
      raise ValueError(f"`min_delta` must be >= 0, got {min_delta!r}.")
    if not float(self.drop_tolerance) >= 0.0:  # Also rejects NaN.
      raise ValueError(
          f"`drop_tolerance` must be >= 0, got {self.drop_tolerance!r}."
      )
    if self.direction not in _DIRECTIONS:
      raise ValueError(
          f"`direction` must be one of {', '.join(map(repr, _DIRECTIONS))};"
          f" got {self.direction!r}."
      )

  def init(self) -> AdaptiveAlphaState:
    """The state before the first evaluation."""
    return AdaptiveAlphaState(
        alpha=jnp.asarray(self.initial_alpha, jnp.float32),
        best_metric=jnp.asarray(-jnp.inf, jnp.float32),
        stall_count=jnp.zeros((), jnp.int32),
    )

  def update(
      self, state: AdaptiveAlphaState, validation_metric: ArrayLike
  ) -> tuple[AdaptiveAlphaState, Array]:
    """Applies the rule to one evaluation; returns ``(new_state, alpha)``.

    Args:
      state: The state from :meth:`init` or a previous :meth:`update`.
      validation_metric: A scalar, higher is better; may be traced.

    Returns:
      The new state and its ``alpha`` (a float32 scalar).
    """
    metric = jnp.asarray(validation_metric)
    if metric.ndim != 0:
      raise ValueError(
          "`validation_metric` must be a scalar, got shape"
          f" {tuple(metric.shape)}."
      )
    if not (
        jnp.issubdtype(metric.dtype, jnp.floating)
        or jnp.issubdtype(metric.dtype, jnp.integer)
    ):
      raise TypeError(
          "`validation_metric` must be a real number, got dtype"
          f" {metric.dtype}."
      )
    metric = metric.astype(jnp.float32)
    best = jnp.asarray(state.best_metric).astype(jnp.float32)
    alpha = jnp.asarray(state.alpha).astype(jnp.float32)
    stall_count = jnp.asarray(state.stall_count).astype(jnp.int32)

    # Comparisons with NaN are False: a NaN metric is neither an improvement
    # nor a drop, only a stall.
    improved = metric > best + jnp.float32(self.min_delta)
    dropped = metric < best - jnp.float32(self.drop_tolerance)
    stall_count = jnp.where(improved, 0, stall_count + 1)
    move = jnp.logical_not(improved) & (
        dropped | (stall_count >= self.patience)
    )
    sign = -1.0 if self.direction == "hard" else 1.0
    moved_alpha = jnp.clip(
        alpha + sign * self.step_size, self.min_alpha, self.max_alpha
    )
    alpha = jnp.where(move, moved_alpha, alpha)
    stall_count = jnp.where(move, 0, stall_count)
    best = jnp.where(improved, metric, best)
    return AdaptiveAlphaState(alpha, best, stall_count), alpha


def temperature_grid_loss(
    loss_fn: Callable[..., Any],
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperatures: ArrayLike,
    **loss_kwargs: Any,
) -> Any:
  r"""Evaluates a temperature-dependent loss at several temperatures at once.

  .. math::
    G_k = \ell(z^S, z^T;\ T = T_k), \qquad k = 1, \dots, K

  ``loss_fn(student_logits, teacher_logits, temperature=t, **loss_kwargs)``
  is evaluated for every ``t`` in ``temperatures`` by one ``jax.vmap`` over
  the temperature (a single traced call, not a Python loop). Use it to score
  candidate temperatures on a validation batch, for example to pick the
  temperature of a schedule. Losses at different temperatures are on the
  same scale only if ``loss_fn`` makes them so (``kd_loss`` multiplies the
  KL by :math:`T^2` for this reason).

  Args:
    loss_fn: A loss taking ``(student_logits, teacher_logits, *,
      temperature, **loss_kwargs)``, such as ``jaxkd.losses.kd_loss``.
    student_logits: Passed to ``loss_fn`` unchanged.
    teacher_logits: Passed to ``loss_fn`` unchanged.
    temperatures: A non-empty 1-D array of positive temperatures, shape
      ``[num_temperatures]``; integer values are cast to float32.
    **loss_kwargs: Further keyword arguments of ``loss_fn`` (``axis``,
      ``where``, ...), the same for every temperature.

  Returns:
    ``loss_fn``'s output stacked on a new leading axis: shape
    ``[num_temperatures, ...]`` (for a pytree output, every leaf).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses, schedules
    >>> student = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    >>> teacher = jnp.array([[1.0, 2.0, 4.0], [3.0, 1.0, 0.0]])
    >>> grid = schedules.temperature_grid_loss(
    ...     losses.kd_loss, student, teacher, jnp.array([1.0, 2.0, 4.0]))
    >>> print(grid.shape)
    (3, 2)
    >>> print(grid.mean(axis=1).round(4))
    [0.0408 0.0603 0.0621]

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

  .. versionadded:: 0.1.0
  """
  temperatures = jnp.asarray(temperatures)
  if temperatures.ndim != 1:
    raise ValueError(
        "`temperatures` must be a 1-D array of temperatures, got shape"
        f" {tuple(temperatures.shape)}."
    )
  if temperatures.shape[0] == 0:
    raise ValueError("`temperatures` must hold at least one temperature.")
  if jnp.issubdtype(temperatures.dtype, jnp.integer):
    temperatures = temperatures.astype(jnp.float32)
  elif not jnp.issubdtype(temperatures.dtype, jnp.floating):
    raise TypeError(
        "`temperatures` must be a floating array, got dtype"
        f" {temperatures.dtype}."
    )
  # Values are checked when known at trace time; inside the vmap the loss
  # sees a traced temperature and cannot check it itself.
  if not isinstance(temperatures, jax.core.Tracer):
    concrete = np.asarray(temperatures)
    if not np.all(concrete > 0):
      raise ValueError(
          f"`temperatures` must all be > 0, got {concrete.tolist()}."
      )

  def loss_at(temperature: Array) -> Any:
    return loss_fn(
        student_logits, teacher_logits, temperature=temperature,
        **loss_kwargs,
    )

  return jax.vmap(loss_at)(temperatures)
