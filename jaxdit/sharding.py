"""The device mesh, the sharding rules and the multi-host set-up, in one place.

The mesh has three axes. `data`: parameters replicated, the batch split, gradients all-reduced:
pmap's data parallelism, written with `jax.jit` over a mesh. `fsdp`: the batch split too, and
every large parameter (with its EMA and optimizer moments) split along one dimension
(ZeRO-3); XLA gathers a parameter where a layer needs it. `context`: the batch and the
parameters replicated, each clip's video tokens split along the sequence, attention written by
hand in `jaxdit.context_parallel`. The default puts every device on `data`. Arrays get their
shardings from logical axis names through `RULES`.
"""

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxdit.options import CONTEXT_AXIS

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", CONTEXT_AXIS)
# logical axis -> mesh axes. Every array dimension gets one logical name (or None: whole).
RULES = {
    "batch": ("data", "fsdp"),  # examples are split over every data-parallel device (not over context)
    "param_shard": "fsdp",  # the one dimension along which a large parameter is split
    "tokens": CONTEXT_AXIS,  # the video tokens of a clip, inside the model (jaxdit.context_parallel)
}
# Parameters smaller than this stay whole on every device: gathering them costs more time
# than splitting saves memory.
MIN_SHARDED_SIZE = 2**12
# Where a VideoDiT with `model.scan_layers` keeps its blocks: every array under this name (the
# parameters, their EMA and optimizer moments) has a leading layer axis, which the scan walks.
STACKED_BLOCKS = "stacked_blocks"


def make_mesh(fsdp: int = 1, devices=None, *, context: int = 1) -> jax.sharding.Mesh:
    """A (data, fsdp, context) mesh over every device of every process (or `devices`).

    `context` is the last axis: jax.make_mesh puts it on the most closely connected devices,
    which attention's all-to-alls and ring passes need most.
    """
    devices = jax.devices() if devices is None else list(devices)
    for name, size in (("train.fsdp", fsdp), ("train.context", context)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}.")
    if len(devices) % (fsdp * context):
        raise ValueError(
            f"train.context={context} x train.fsdp={fsdp} = {fsdp * context} does not divide the {len(devices)} "
            f"devices; pick sizes whose product divides {len(devices)} (sample.py: --fsdp x --context)."
        )
    shape = (len(devices) // (fsdp * context), fsdp, context)
    # Auto axes: XLA propagates shardings through the step from the inputs' shardings.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec(*logical_axes: str | None) -> PartitionSpec:
    """Logical axis names -> the mesh axes they map to."""
    return PartitionSpec(*(RULES[name] if name else None for name in logical_axes))


def param_axes(shape: tuple[int, ...], fsdp: int, *, stacked: bool = False) -> tuple[str | None, ...]:
    """The logical axes of a parameter: its largest dimension that `fsdp` divides is split.

    stacked: the leading axis indexes layers. It is never split, as each scan step takes one
    layer and every device needs its share of that layer; the rest splits as one layer would.
    """
    if stacked:
        return (None, *param_axes(shape[1:], fsdp))
    axes = [None] * len(shape)
    if fsdp > 1 and np.prod(shape, dtype=np.int64) >= MIN_SHARDED_SIZE:
        divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
        if divisible:
            axes[max(divisible, key=lambda i: shape[i])] = "param_shard"
    return tuple(axes)


def is_stacked(path) -> bool:
    """Whether the array at this pytree path is a stacked-blocks one (a leading layer axis)."""
    return STACKED_BLOCKS in jax.tree_util.keystr(path, simple=True, separator="/").split("/")


def state_sharding(tree, mesh: jax.sharding.Mesh):
    """Shardings for a tree of (abstract) arrays: parameters, their EMA, optimizer state.

    Scalars and small arrays are replicated; optimizer moments shard like their parameters
    because the rule only looks at the shape and at whether the path holds `STACKED_BLOCKS`.
    """
    fsdp = mesh.shape["fsdp"]

    def sharding(path, x):
        return NamedSharding(mesh, spec(*param_axes(x.shape, fsdp, stacked=is_stacked(path))))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Arrays with a leading batch axis: split over the data-parallel devices, replicated over context."""
    return NamedSharding(mesh, spec("batch"))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """Devices that hold different examples: the batch must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """This process's share of the batch (NumPy) -> global jax.Arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def initialize_distributed() -> None:
    """Joins the processes of a multi-host run; does nothing for a single process.

    - TPU pod slice, SLURM or Open MPI: JAX finds the coordinator, process count and index.
    - Several GPU hosts by hand: set JAX_COORDINATOR_ADDRESS=host0:1234, JAX_NUM_PROCESSES=N
      and JAX_PROCESS_ID=i (0..N-1) in each process's environment.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in os.environ]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set the number of "
                "processes and this process's index (0..N-1) for every process."
            )
        jax.distributed.initialize(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"])
        )
    elif _in_cluster():
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def _in_cluster() -> bool:
    """Launched as one of several processes by a TPU pod, SLURM or Open MPI."""
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (
        "," in tpu_hosts
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
