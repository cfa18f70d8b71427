"""Data-parallel, FSDP and teacher-axis placement of a distillation run.

The train step of :mod:`jaxkd.train_step` is one ``jax.jit`` program written
for a single device. Sharding it takes no change to the step: its *inputs*
are placed on a device mesh and the compiler partitions the program from
their shardings (GSPMD). This module builds the mesh and the placements:

* :func:`make_mesh`: a ``("data", "teacher")`` mesh whose axes have type
  ``AxisType.Auto`` (shardings propagate from the inputs through the step);
* :func:`shard_batch`: the batch split along its batch axis over ``"data"``
  (data parallelism; the gradients are all-reduced by the compiler);
* :func:`shard_state` / :func:`state_shardings`: the train state replicated,
  or with ``fsdp=True`` its large leaves split over ``"data"`` (fully sharded
  data parallelism: each device stores a slice of the parameters, moments and
  large teachers, and the compiler gathers them where they are used); the
  stacked teachers split over ``"teacher"`` when that axis is larger than 1
  (each device runs its own teachers under the ``"vmap"`` strategy);
* multi-host helpers: :func:`initialize_distributed`,
  :func:`process_batch_rows` and :func:`host_batch_to_global`, which
  assembles a global batch from every process's local slice.

Example::

  mesh = sharding.make_mesh()                     # every device on "data"
  state = sharding.shard_state(spec.init(key, batch, tvars), mesh)
  step = train_step.make_train_step(spec)  # or state_shardings=...
  for batch in batches:
    state, metrics = step(state, sharding.shard_batch(batch, mesh))

No ``pmap`` and no ``shard_map``: the step is the single-device program, and
its numbers equal the single-device step's up to the order of floating-point
reductions (BatchNorm statistics are computed over the global batch).

Two things measured with jaxlib 0.10.2 (8 CPU devices) that cost
communication under data parallelism, though the numbers stay right:

* The ``"vmap"`` teacher strategy turns a convolutional teacher's
  convolutions into grouped convolutions, and XLA's SPMD partitioner gathers
  the batch before every grouped convolution (depthwise ones excepted).
  ``"unroll"`` and ``"scan"`` keep the teachers' activations sharded.
* ``accumulation_steps > 1`` splits the batch into contiguous micro-batches,
  which do not lie on the devices that hold them: the compiler moves the
  examples between devices, or computes every micro-batch on every device
  when the split does not line up with the shards.
"""

from jaxkd.sharding._batches import batch_shardings as batch_shardings
from jaxkd.sharding._batches import host_batch_to_global as host_batch_to_global
from jaxkd.sharding._batches import initialize_distributed as initialize_distributed
from jaxkd.sharding._batches import process_batch_rows as process_batch_rows
from jaxkd.sharding._batches import shard_batch as shard_batch
from jaxkd.sharding._batches import TEACHER_AXIS_FIRST_KEYS as TEACHER_AXIS_FIRST_KEYS
from jaxkd.sharding._mesh import AXIS_NAMES as AXIS_NAMES
from jaxkd.sharding._mesh import batch_sharding as batch_sharding
from jaxkd.sharding._mesh import DATA_AXIS as DATA_AXIS
from jaxkd.sharding._mesh import make_mesh as make_mesh
from jaxkd.sharding._mesh import replicated as replicated
from jaxkd.sharding._mesh import TEACHER_AXIS as TEACHER_AXIS
from jaxkd.sharding._state import DEFAULT_FSDP_MIN_SIZE as DEFAULT_FSDP_MIN_SIZE
from jaxkd.sharding._state import shard_state as shard_state
from jaxkd.sharding._state import state_shardings as state_shardings

__all__ = [
    "AXIS_NAMES",
    "DATA_AXIS",
    "DEFAULT_FSDP_MIN_SIZE",
    "TEACHER_AXIS",
    "TEACHER_AXIS_FIRST_KEYS",
    "batch_sharding",
    "batch_shardings",
    "host_batch_to_global",
    "initialize_distributed",
    "make_mesh",
    "process_batch_rows",
    "replicated",
    "shard_batch",
    "shard_state",
    "state_shardings",
]
