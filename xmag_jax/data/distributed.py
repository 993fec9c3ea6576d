"""Multi-host plumbing: joining the job, and per-process numpy batches → global `jax.Array`s over the mesh."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from absl import flags

from xmag_jax import errors


def initialize_distributed(fv: flags.FlagValues) -> None:
    """Join the multi-host job named by the `define_distributed` flags in `fv`, before anything touches the
    devices (no-op for a single process)."""
    address, count, index = fv.coordinator_address, fv.num_processes, fv.process_id
    given = [address is not None, count is not None, index is not None]
    if any(given) and not all(given):
        raise errors.UserError("--coordinator_address, --num_processes and --process_id go together")
    if all(given):
        jax.distributed.initialize(address, count, index)
    elif fv.distributed:
        jax.distributed.initialize()


def global_batch(
    local_batch: Mapping[str, np.ndarray],
    shardings: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding],
) -> dict[str, jax.Array]:
    """Each process's slice of the batch → one global array per key (`jax.make_array_from_process_local_data`).

    `shardings`: one sharding for every key, or one per key; the batch dimension (axis 0) is the one split
    over the mesh's data axes, e.g. `NamedSharding(mesh, P(("data", "fsdp")))`. The global batch is
    `process_count` times the local one, processes in `process_index` order.
    """
    out = {}
    for key, value in local_batch.items():
        sharding = shardings[key] if isinstance(shardings, Mapping) else shardings
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def process_slice(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int) -> slice:
    """The rows along `axis` of a global array of `shape` under `sharding` that this process's devices hold:
    what this process loads for `global_batch` (the whole axis when it is not split over processes).
    ValueError when they are not one contiguous range (a mesh whose data axes interleave processes)."""
    spans = {(i[axis].start or 0, shape[axis] if i[axis].stop is None else i[axis].stop)
             for i in sharding.addressable_devices_indices_map(shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"this process's devices hold rows {sorted(spans)} of axis {axis}: not one contiguous "
                         f"range; order the mesh's devices by process")
    return slice(lo, hi)


def define_distributed(fv: flags.FlagValues) -> None:
    """The multi-host flags of `initialize_distributed` (train, teacher_cache, finetune)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with cluster auto-detection.",
                      flag_values=fv)
