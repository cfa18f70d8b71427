"""Teachers: K frozen models of one architecture run by one compiled call.

Teachers of the same architecture are held with their parameters stacked on a
new leading axis of size ``K`` (:func:`stack_params`), so that K teachers are
one pytree and one call, whatever K. The configuration and the arrays are kept
apart on purpose:

* :class:`TeacherGroup` is static: the :class:`~jaxkd.models._contract.Model`,
  the execution strategy and a name. It hashes by identity and can be closed
  over by ``jax.jit`` or passed as a static argument.
* :class:`TeacherVariables` holds the stacked ``params`` and ``state`` arrays.
  It is a pytree and must travel as a jit *argument*: a closed-over array is
  embedded in the compiled program as a constant, which for large teachers
  bloats the HLO and the compile time.

:func:`apply_teachers` runs every teacher of a group in eval mode
(``train=False``, no dropout key) behind ``jax.lax.stop_gradient``, and returns
their logits ``[K, batch, num_classes]`` and features ``{name: [K, ...]}``.
Teachers never receive a gradient, and no gradient flows back through their
outputs into whatever produced their input.

Three strategies compute the same numbers:

* ``"vmap"``: ``jax.vmap`` over the stacked parameters. Matrix products become
  batched products and convolutions become grouped convolutions.
* ``"scan"``: ``jax.lax.scan`` over the teacher axis. Teachers run one after
  the other; the model is traced and compiled once whatever K, and only one
  teacher's activations are alive at a time.
* ``"unroll"``: a Python loop over the teachers inside the same jit. The
  program holds K copies of the model, each compiled as an ordinary
  (non-batched) model.
* ``"auto"``: picks one of the above from ``jax.default_backend()``
  (see ``jaxkd.teachers._strategy._AUTO_STRATEGY``).

Teachers of different architectures form several groups, run together by
:func:`apply_teacher_groups`.

Example::

  group, variables = TeacherGroup.create(model, params_list, state_list)
  step = jax.jit(lambda variables, x: apply_teachers(group, variables, x))
  outputs = step(variables, x)  # outputs.logits: [K, batch, num_classes]
"""

from jaxkd._stacking import num_stacked
from jaxkd._stacking import stack_params
from jaxkd._stacking import unstack_params
from jaxkd.teachers._group import TeacherGroup
from jaxkd.teachers._group import TeacherOutputs
from jaxkd.teachers._group import TeacherVariables
from jaxkd.teachers._group import apply_teachers
from jaxkd.teachers._mixed import apply_teacher_groups
from jaxkd.teachers._mixed import check_same_classes
from jaxkd.teachers._sharding import shard_teacher_axis
from jaxkd.teachers._strategy import STRATEGIES
from jaxkd.teachers._strategy import resolve_strategy

__all__ = [
    "STRATEGIES",
    "TeacherGroup",
    "TeacherOutputs",
    "TeacherVariables",
    "apply_teacher_groups",
    "apply_teachers",
    "check_same_classes",
    "num_stacked",
    "resolve_strategy",
    "shard_teacher_axis",
    "stack_params",
    "unstack_params",
]
