"""The data, models and compiled steps shared by every run of a process."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Mapping

import jax
import ml_collections

from experiments import input_pipeline
from experiments import methods as methods_lib
from experiments import model_checks
from jaxkd import models
from jaxkd import sharding
from jaxkd import teachers as teachers_lib
from jaxkd.models import Model
from jaxkd.state import DistillState
from jaxkd.train_step import Views

# ---------------------------------------------------------------------------
# The shared context of a process.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """Data, models and compiled steps shared by every run of one process.

  Models, teacher groups and ``Distillation`` objects are static arguments
  of the compiled steps (hashed by identity), so they are built once and
  cached here: the second seed of a pipeline compiles nothing.
  """

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data: input_pipeline.Data
  mesh: Any = None
  _cache: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             workdir: str | pathlib.Path) -> Context:
    """Opens the data and checks that the models take its images."""
    data = input_pipeline.setup(config)
    context = cls(config=config, workdir=pathlib.Path(workdir), data=data)
    for role in ("student", "teacher"):
      model = context.model(config[role].model)
      model_checks.check_input_shape(
          model, data.image_shape,
          where=f"`{role}.model` on data set {data.spec.name!r}")
    if config.data_parallel and jax.device_count() > 1:
      devices = jax.device_count()
      for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
          raise ValueError(
              f"`{name}` {config[name]} is not divisible by the"
              f" {devices} devices (data parallelism); change it or set"
              " `data_parallel=False`."
          )
      context.mesh = sharding.make_mesh()
    return context

  def cached(self, key: Any, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def model(self, name: str) -> Model:
    return self.cached(("model", name), lambda: models.create(
        name, num_classes=self.data.num_classes))

  def group(self, model_name: str) -> teachers_lib.TeacherGroup:
    return self.cached(("group", model_name), lambda: (
        teachers_lib.TeacherGroup(self.model(model_name), name="teacher")))

  def born_again_group(self) -> teachers_lib.TeacherGroup:
    """A teacher of the student's architecture (born-again networks)."""
    return self.cached(("born_again_group",), lambda: (
        teachers_lib.TeacherGroup(self.model(self.config.student.model),
                                  name="teacher")))

  def group_for(self, plan: methods_lib.Plan
                ) -> teachers_lib.TeacherGroup | None:
    """The teacher group a method's plan runs with, or None."""
    if plan.teacher_is_student:
      return self.born_again_group()
    if plan.num_teachers or plan.data_free:
      return self.group(self.config.teacher.model)
    return None

  def put(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    if self.mesh is None:
      return batch
    return sharding.shard_batch(batch, self.mesh)

  def place(self, state: DistillState) -> DistillState:
    if self.mesh is None:
      return state
    return sharding.shard_state(state, self.mesh)


def _views(shift_pixels: int, extra: Views = Views()) -> Views:
  shared = None
  if shift_pixels:
    shared = functools.partial(input_pipeline.random_shift,
                               pixels=int(shift_pixels))
  return dataclasses.replace(extra, shared=shared)
