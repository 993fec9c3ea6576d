"""Cloud TPU slice names -> libtpu topologies, chip specs, and compile-only devices.

`parse("v5p-256", slices=2)` gives a `Topology`; `compile_devices(topo)` gives libtpu's compile-only
devices for it (no TPU needed, only the `libtpu` package), one per chip, which a `jax.sharding.Mesh` can
be built over and `jit(...).lower(...).compile()` can target.

Naming follows the Cloud TPU accelerator types: v4 and v5p names count TensorCores (two per chip, used as
one "megacore" device: `v5p-256` = 128 chips), v5e (`v5litepod-N`) and v6e names count chips.
Chip numbers are from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, v5e,
v5p, v6e): HBM per chip and peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from xmag_jax import errors

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm_bytes` per chip; `peak_bf16_flops` per chip per second."""

    generation: str  # libtpu's name in "v5p:4x4x8"
    hbm_bytes: int  # nominal, as the Cloud TPU docs state it
    usable_hbm_bytes: int  # what XLA:TPU may allocate (libtpu's compile-time limit; its OOM message)
    peak_bf16_flops: float
    cores_per_name_unit: int  # TensorCores counted per chip in the accelerator-type name
    chip_config: str  # libtpu chip config giving one JAX device per chip
    dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    shapes: dict[int, str]  # chips -> topology string for the standard single-slice shapes


_SHAPES_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
    256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16",
}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, int(30.75 * GiB), 275e12, 2, "megacore", 3, _SHAPES_3D),
    "v5p": Chip("v5p", 95 * GiB, int(95.73 * GiB), 459e12, 2, "default", 3, _SHAPES_3D),
    "v5e": Chip("v5e", 16 * GiB, int(15.75 * GiB), 197e12, 1, "default", 2, _SHAPES_2D),
    "v6e": Chip("v6e", 32 * GiB, int(31.24 * GiB), 918e12, 1, "default", 2, _SHAPES_2D),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or `slices` identical slices joined over the data-centre network)."""

    name: str  # e.g. "v5p-256"
    chip: Chip
    shape: str  # e.g. "4x4x8", chips per slice along each torus axis
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.shape.split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.generation}:{self.shape}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per TPU VM host: 2x2 on multi-host slices; one host holds a whole slice of at most 8 chips."""
        dims = [int(d) for d in self.shape.split("x")] + [1] * (3 - self.chip.dims)
        if self.chip.dims == 2 and self.chips_per_slice <= 8:
            return tuple(dims)  # type: ignore[return-value]
        return (min(2, dims[0]), min(2, dims[1]), 1)

    @property
    def num_hosts(self) -> int:
        return self.num_chips // math.prod(self.chips_per_host_bounds)

    @property
    def hbm_bytes_total(self) -> int:
        return self.num_chips * self.chip.hbm_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topology": self.libtpu_name,
            "slices": self.slices,
            "chips": self.num_chips,
            "hosts": self.num_hosts,
            "hbm_gib_per_chip": self.chip.hbm_bytes / GiB,
            "usable_hbm_gib_per_chip": self.chip.usable_hbm_bytes / GiB,
            "peak_bf16_tflops_per_chip": self.chip.peak_bf16_flops / 1e12,
        }


class UnknownTopologyError(errors.UserError, ValueError):
    """A topology name that is not a known TPU slice (the message lists the known ones)."""


def known_names() -> list[str]:
    """Every accelerator-type name `parse` accepts, e.g. ['v4-8', ..., 'v6e-256']."""
    names = []
    for gen, chip in CHIPS.items():
        names += [f"{gen}-{n * chip.cores_per_name_unit}" for n in sorted(chip.shapes)]
    return names


def parse(name: str, slices: int = 1) -> Topology:
    """'v5p-256' -> Topology(v5p:4x4x8). Also takes 'v5litepod-256' and libtpu's own 'v5p:4x4x8'."""
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if m is None or gen not in CHIPS:
        raise UnknownTopologyError(
            f"unknown TPU topology {name!r}; known names: {', '.join(known_names())} "
            "(or libtpu's form GEN:AxBxC, e.g. v5p:4x4x8)")
    chip = CHIPS[gen]
    if m.group(3):
        shape = m.group(3)
        if len(shape.split("x")) != chip.dims:
            raise UnknownTopologyError(
                f"unknown TPU topology {name!r}: {gen} topologies have {chip.dims} dimensions; "
                f"known names: {', '.join(known_names())}")
        return Topology(f"{gen}-{_chips(shape) * chip.cores_per_name_unit}", chip, shape, slices)
    count = int(m.group(2))
    chips, rem = divmod(count, chip.cores_per_name_unit)
    if rem or chips not in chip.shapes:
        raise UnknownTopologyError(
            f"unknown TPU topology {name!r}; known {gen} names: "
            f"{', '.join(n for n in known_names() if n.startswith(gen + '-'))}; all: {', '.join(known_names())}")
    return Topology(f"{gen}-{count}", chip, chip.shapes[chips], slices)


def _chips(shape: str) -> int:
    return math.prod(int(d) for d in shape.split("x"))


def compile_devices(topo: Topology) -> list[Any]:
    """libtpu compile-only devices for `topo`, one per chip, slice-major; needs the `libtpu` package."""
    from jax.experimental import topologies as jax_topologies  # pylint: disable=g-import-not-at-top

    if "tpu" not in (os.environ.get("JAX_PLATFORMS") or "tpu"):
        # Compile-only use on a non-TPU host: stop libtpu from probing the GCE metadata server for a TPU VM
        # it is not running on (it would only warn, after a timeout), and from taking /tmp/libtpu_lockfile,
        # which guards a real TPU and would keep a second compiling process (tests, another report) out.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.chip.generation}-{topo.chip.cores_per_name_unit * 4}")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    desc = jax_topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.libtpu_name,
        chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=topo.slices,
    )
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {topo.name} x{topo.slices}, "
                           f"expected {topo.num_chips}")
    return devices
