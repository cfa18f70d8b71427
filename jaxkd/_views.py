"""The student's and the teachers' views of a batch, made inside the step."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

ViewFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Views:
  """How the student's and the teachers' inputs are made from a batch.

  Every function is ``fn(images, key) -> images`` and runs inside the step:

  * ``shared``: one augmentation both sides see (function matching, Beyer
    et al. 2022), optionally followed by mixup with ``mixup_alpha > 0``
    (labels become soft);
  * ``student``: a further transform for the student only (a noisier view);
  * ``teacher``: a further transform for the teachers only, e.g.
    ``functools.partial(losses.perturb_inputs, noise_scale=0.1)`` for
    perturbation-robust distillation.
  """

  shared: ViewFn | None = None
  student: ViewFn | None = None
  teacher: ViewFn | None = None
  mixup_alpha: float = 0.0

  def __post_init__(self):
    if self.mixup_alpha < 0:
      raise ValueError(f"`mixup_alpha` must be >= 0, got {self.mixup_alpha}.")


def _mixup(images, labels, key, alpha):
  """Mixed images and a function of the class count giving mixed labels."""
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(jnp.float32)
  perm = jax.random.permutation(perm_key, images.shape[0])
  mixed = lam.astype(images.dtype) * images + (1 - lam).astype(
      images.dtype
  ) * images[perm]

  def mixed_labels(num_classes: int) -> jax.Array | None:
    if labels is None:
      return None
    soft = labels
    if jnp.issubdtype(soft.dtype, jnp.integer):
      soft = jax.nn.one_hot(soft, num_classes, dtype=jnp.float32)
    return lam * soft + (1 - lam) * soft[perm]

  return mixed, mixed_labels


def make_views(
    views: Views, images, labels, key
) -> tuple[jax.Array, jax.Array, Callable[[int], jax.Array | None]]:
  """``(student_images, teacher_images, labels_for)`` of one step.

  ``labels_for(num_classes)`` gives the step's labels: the batch's, or their
  mixup (soft, ``[B, num_classes]``).
  """
  shared_key, mix_key, student_key, teacher_key = jax.random.split(key, 4)
  if views.shared is not None:
    images = views.shared(images, shared_key)
  labels_for = lambda num_classes: labels
  if views.mixup_alpha > 0:
    images, labels_for = _mixup(images, labels, mix_key, views.mixup_alpha)
  student_images = (
      images if views.student is None else views.student(images, student_key)
  )
  teacher_images = (
      images if views.teacher is None else views.teacher(images, teacher_key)
  )
  return student_images, teacher_images, labels_for
