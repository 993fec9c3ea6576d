"""Device mesh and the logical-axis -> mesh-axis rules (MaxText style), kept in this one place.

Mesh axes: `data` (pure data parallel: parameters replicated) and `fsdp` (data parallel with parameters,
gradients and optimizer state sharded along their `embed` dimension). The batch is split over both.

Logical axis names come from the models' parameter annotations (`nnx.with_partitioning`): `embed`
(model width), `mlp` (MLP hidden), `heads` (attention qkv/proj), `layers` (stacked blocks of a scanned
model: never sharded), None elsewhere; activations use `batch`.
A logical name without a rule stays unsharded.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
from flax import linen as nn
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xmag_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Parameters FSDP-sharded along `embed`; batch over every device.
FSDP_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
)
# Parameters fully replicated (e.g. a frozen teacher that fits on each device).
REPLICATED_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
)
TEACHER_SHARDINGS = ("replicate", "fsdp")


def rules_for(kind: Literal["replicate", "fsdp"]) -> tuple[tuple[str, Any], ...]:
    """Logical axis rules by name: 'fsdp' (the student, and a teacher too large to replicate) or 'replicate'."""
    if kind == "fsdp":
        return FSDP_RULES
    if kind == "replicate":
        return REPLICATED_RULES
    raise ValueError(f"config.teacher.sharding: expected one of {TEACHER_SHARDINGS}, got {kind!r}")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    """Resolves `config.mesh` ({data, fsdp}; one of them may be -1 = the remaining devices) to sizes.

    Raises `ConfigError` naming `config.mesh` when the sizes do not fit `num_devices`."""
    sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"config.mesh: {num_devices} devices do not divide by the fixed axes' size {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return sizes[0], sizes[1]


def make_mesh(mesh_cfg, devices: list | None = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp') over `devices` (default: all), GSPMD (Auto) axis types.

    One slice: topology-aware device order (`mesh_utils.create_device_mesh`), splitting a physical torus
    axis only when an axis size needs it (fsdp=4 on a 16x16 v6e-256). Several slices (devices with distinct
    `slice_index`): the `data` axis spans the slices over the data-centre network, `fsdp` stays inside one.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if shape[0] % slices:
        raise ConfigError(f"config.mesh.data={shape[0]} must be a multiple of the {slices} slices")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1]), (slices, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (product of the mesh axes the batch is split over)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1, leading: int = 0) -> NamedSharding:
    """Sharding of an array whose axis `leading` is the batch; other axes replicated."""
    spec = [None] * ndim
    spec[leading] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _divisible(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    """Drops mesh axes from any dimension they do not divide (that dimension is then replicated)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(sharding.mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays / `nnx.Variable`s (e.g. a train state from `jax.eval_shape`).

    Variables use their logical `out_sharding` annotation mapped through `rules`; plain arrays and
    unannotated variables are replicated, and so is any dimension its mesh axes do not divide (e.g.
    `embed` 384 over fsdp 256). The result has the tree structure of `abstract_tree`.
    """
    logical = nnx.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    return jax.tree.map(lambda x, s: _divisible(tuple(x.shape), s), abstract_tree, shardings)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Attaches shardings to a tree of `jax.ShapeDtypeStruct`s (for `.lower()` / Orbax restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)

