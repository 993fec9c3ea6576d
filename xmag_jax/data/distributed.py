"""Per-process numpy batches → global `jax.Array`s sharded over the mesh."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


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
