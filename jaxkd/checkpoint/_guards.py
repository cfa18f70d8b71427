"""What a :class:`~jaxkd.checkpoint.Checkpointer` keeps and refuses to save.

Its options as Orbax's (checked; the preservation policy is Orbax's own),
the guard against saving a diverged state, and the filter that keeps
Orbax's multi-line reports of a failed background save off the logs.
Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxkd.checkpoint._trees import PyTree
from jaxkd.checkpoint._trees import _metric_value
from jaxkd.checkpoint._trees import _path_str
from jaxkd.state import DistillState


class CheckpointWriteError(OSError):
  """A step could not be written (disk full, say); older steps are intact.

  ``errno`` is the original error's; ``str()`` is one line naming the step
  directory.

  .. versionadded:: 0.1.0
  """

  def __str__(self) -> str:
    return str(self.strerror)


class _DropOrbaxErrors(logging.Filter):
  """Drops Orbax's own ERROR records while a :class:`Checkpointer` is open.

  A failed background save is logged by Orbax as several tracebacks, from
  its threads; the same error reaches :meth:`Checkpointer.save`,
  ``wait_until_finished`` or ``close``, which raise it as one
  :class:`CheckpointWriteError` (the original chained).
  """

  users = 0

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_ERRORS = _DropOrbaxErrors()


def _hold_orbax_errors(hold: bool) -> None:
  absl_logger = logging.getLogger("absl")
  _DropOrbaxErrors.users += 1 if hold else -1
  if _DropOrbaxErrors.users > 0:
    absl_logger.addFilter(_ORBAX_ERRORS)  # no-op when present
  else:
    absl_logger.removeFilter(_ORBAX_ERRORS)


_BEST_MODES = ("max", "min")


def _ranking_metric(metrics: Any, *, name: str, mode: str) -> float:
  """A step's value of metric ``name`` for Orbax's ranking; the worst if none."""
  value = _metric_value(metrics, name)
  if value is None:
    return -np.inf if mode == "max" else np.inf
  return value


def _manager_options(
    *, max_to_keep: int | None, best_metric: str | None, best_mode: str,
    save_interval_steps: int,
) -> ocp.CheckpointManagerOptions:
  """Orbax's options for a :class:`Checkpointer`'s arguments, checked.

  Raises:
    ValueError: Naming the first bad argument.
  """
  if max_to_keep is not None and (
      isinstance(max_to_keep, bool) or int(max_to_keep) < 1
  ):
    raise ValueError(
        f"`max_to_keep` must be None or an integer >= 1, got {max_to_keep!r}."
    )
  if best_mode not in _BEST_MODES:
    raise ValueError(
        f"`best_mode` must be one of {_BEST_MODES}, got {best_mode!r}."
    )
  if best_metric is not None and (
      not isinstance(best_metric, str) or not best_metric
  ):
    raise ValueError(
        f"`best_metric` must be None or a metric name, got {best_metric!r}."
    )
  if isinstance(save_interval_steps, bool) or int(save_interval_steps) < 1:
    raise ValueError(
        "`save_interval_steps` must be an integer >= 1, got"
        f" {save_interval_steps!r}."
    )
  metric_fn = None if best_metric is None else functools.partial(
      _ranking_metric, name=best_metric, mode=best_mode)
  return ocp.CheckpointManagerOptions(
      save_interval_steps=int(save_interval_steps),
      # Orbax writes (and reads back for the policy) the metrics only when
      # `best_fn` is set; with a preservation policy it ranks nothing else.
      best_fn=metric_fn,
      best_mode=best_mode,
      preservation_policy=_preservation_policy(
          None if max_to_keep is None else int(max_to_keep), metric_fn,
          best_mode),
      create=True,
  )


def _preservation_policy(
    n: int | None, metric_fn, mode: str
) -> ocp.checkpoint_managers.PreservationPolicy:
  """The last ``n`` steps, and with ``metric_fn`` the best one too.

  ``metric_fn`` gives every step a number, the worst possible one to a step
  without a finite value of the metric (:func:`_ranking_metric`).
  ``BestN`` sorts stably and keeps the last of the sorted steps, so among
  ties the latest step wins. A step without the metric can thus win only
  when no step has it; every step :meth:`Checkpointer.save` writes carries
  Orbax's metrics item, so the winner is then the latest step, which
  ``LatestN`` keeps anyway: no step is kept for being "best" without a
  finite value.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=n)]
  if metric_fn is not None:
    policies.append(ocp.checkpoint_managers.BestN(
        n=1, get_metric_fn=metric_fn, reverse=mode == "min",
        keep_checkpoints_without_metrics=False))
  return ocp.checkpoint_managers.AnyPreservationPolicy(policies)



@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _nonfinite_param(params: PyTree) -> str | None:
  """Path of the first floating parameter with a NaN or an infinity."""
  leaves = [
      (path, leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  if not leaves:
    return None
  flags = np.asarray(jax.device_get(_finite_flags([x for _, x in leaves])))
  for (path, _), finite in zip(leaves, flags):
    if not finite:
      return _path_str(path)
  return None


def _refusal(state: DistillState, metrics: dict | None) -> str | None:
  """Why ``state`` must not be saved, or None."""
  if metrics is not None and "nonfinite" in metrics:
    flagged = np.asarray(metrics["nonfinite"], dtype=np.float64)
    if np.any(flagged > 0) or not np.all(np.isfinite(flagged)):
      return f"metrics['nonfinite'] is {metrics['nonfinite']}"
  path = _nonfinite_param(state.params)
  if path is not None:
    return f"parameter params/{path} is not finite"
  return None
