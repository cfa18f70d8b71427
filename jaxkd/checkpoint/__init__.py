"""Checkpoints of a distillation run, on Orbax.

:class:`Checkpointer` saves the student's side of a
:class:`~jaxkd.state.DistillState` (``step``, ``params`` with the terms'
adaptors and heads, ``model_state`` with BatchNorm statistics and CRD queues,
``opt_state`` and ``rng``), the input pipeline's position and the metrics of
the step, one directory per step, through an
``orbax.checkpoint.CheckpointManager``. Every step carries checksums of its
arrays and a manifest of its files; :meth:`Checkpointer.restore` checks them
and falls back to the newest intact step. The teachers are not part of it:
they are frozen, usually much larger than the student, and the same for
every step, so :func:`save_teachers` writes them once and
:func:`load_teachers` reads them back by name.

Layout of ``directory``::

  <step>/state             the student's arrays (Orbax StandardSave)
  <step>/extra             JSON: the data state, the metrics, the checksums
  <step>/metrics           JSON: the best metric, for Orbax's bookkeeping
                           (only with ``best_metric``)
  <step>/jaxkd_files.json  size and checksum of every file of the step
  <step>.corrupt-<n>/      a damaged step, renamed aside by ``restore``
  config.json              the run's config at its first start (``config=``)
  config_history.jsonl     every start and every allowed config change
  teachers/<name>/         one directory per saved teacher group

Example::

  with Checkpointer(workdir, max_to_keep=3, best_metric="accuracy") as ckpt:
    if ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(state)
      iterator.set_state(data_state)
    for batch in iterator:
      state, metrics = step(state, batch)
      ckpt.save(state, metrics=metrics, data_state=iterator.get_state())
"""

from jaxkd.checkpoint._checkpointer import Checkpointer
from jaxkd.checkpoint._guards import CheckpointWriteError
from jaxkd.checkpoint._integrity import CorruptCheckpointError
from jaxkd.checkpoint._reading import Restored
from jaxkd.checkpoint._run_config import ConfigMismatchError
from jaxkd.checkpoint._teachers import load_teachers
from jaxkd.checkpoint._teachers import save_teachers
from jaxkd.checkpoint._teachers import saved_teacher_names
from jaxkd.checkpoint._trees import STATE_FIELDS

__all__ = [
    "STATE_FIELDS",
    "CheckpointWriteError",
    "Checkpointer",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "Restored",
    "load_teachers",
    "save_teachers",
    "saved_teacher_names",
]
