"""Checks a distillation config before anything is compiled; every error names the config key at fault.

`check_config(config)` needs no devices (schema, values, files); `check_against_mesh(config, mesh)` checks
what depends on the device mesh (batch divisibility). The step module's own `validate` adds the model-
geometry checks (token grids that must divide).
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import jax
import ml_collections
from etils import epath

from configs import common
from xmag_jax.distill.projectors import PROJECTOR_NORMS
from xmag_jax.errors import ConfigError

LOSS_MODES = ("dual", "global_only", "local_only")
TEACHER_SHARDINGS = ("replicate", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'optim.lr': 1e-3, ...}`: dotted key -> leaf value."""
    items = config.items() if isinstance(config, Mapping) else config.to_dict().items()
    out: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key of `config` is in `configs.common.base_config()` and vice versa."""
    known = flatten(common.base_config())
    given = flatten(config)
    problems = []
    for key in sorted(set(given) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"config key {key!r} is not a known key{hint}; the schema is configs/common.py")
    for key in sorted(set(known) - set(given)):
        problems.append(f"config key {key!r} is missing; every key of configs/common.py must be set")
    if problems:
        raise ConfigError("\n".join(problems))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Ranges and enumerations of single values."""
    _require(config.total_steps > 0, "total_steps", f"must be > 0, got {config.total_steps}")
    _require(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
    _require(config.log_every > 0, "log_every", f"must be > 0, got {config.log_every}")
    _require(config.checkpoint.every > 0, "checkpoint.every", f"must be > 0, got {config.checkpoint.every}")
    _require(config.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {config.checkpoint.keep}")
    _require(config.peak_tflops_per_device > 0, "peak_tflops_per_device",
             f"must be > 0 TFLOP/s, got {config.peak_tflops_per_device}")
    _require(config.optim.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {config.optim.grad_accum}")
    _require(config.loss.mode in LOSS_MODES, "loss.mode", f"must be one of {LOSS_MODES}, got {config.loss.mode!r}")
    _require(config.loss.projector_norm in PROJECTOR_NORMS, "loss.projector_norm",
             f"must be one of {PROJECTOR_NORMS}, got {config.loss.projector_norm!r}")
    _require(config.data.views >= 1, "data.views", f"must be >= 1 augmented views per pair, got {config.data.views}")
    _require(config.teacher.sharding in TEACHER_SHARDINGS, "teacher.sharding",
             f"must be one of {TEACHER_SHARDINGS}, got {config.teacher.sharding!r}")
    for key in ("teacher.dtype", "student.dtype"):
        value = flatten(config)[key]
        _require(value in DTYPES, key, f"must be one of {DTYPES}, got {value!r}")
    layer_scale = config.student.layer_scale_init
    _require(layer_scale is None or layer_scale > 0, "student.layer_scale_init",
             f"must be None (the registry's) or > 0, got {layer_scale}")
    for key in ("mesh.data", "mesh.fsdp"):
        value = flatten(config)[key]
        _require(value == -1 or value >= 1, key, f"must be -1 (remaining devices) or >= 1, got {value}")


def _probe(key: str, what: str, probe):
    """Run a file-system check, turning storage errors (no credentials, no such bucket) into a ConfigError."""
    try:
        return probe()
    except Exception as error:  # noqa: BLE001 - any storage failure is reported against the key
        raise ConfigError(f"{key}: cannot read {what!r} ({type(error).__name__}: {error})") from error


def check_files(config: ml_collections.ConfigDict) -> None:
    """The teacher checkpoint and the data shards exist."""
    if not config.teacher.checkpoint:
        _require(config.teacher.allow_random_teacher, "teacher.checkpoint",
                 "is empty: set it to an Orbax checkpoint from `python -m xmag_jax.convert import` "
                 "(a random teacher is accepted only with teacher.allow_random_teacher=True)")
    else:
        teacher = config.teacher.checkpoint
        _require(_probe("teacher.checkpoint", teacher, epath.Path(teacher).exists), "teacher.checkpoint",
                 f"{config.teacher.checkpoint!r} does not exist (convert the teacher with "
                 "`python -m xmag_jax.convert import` first)")
    _require(bool(config.data.dir), "data.dir", "is empty: set it to a directory of tile-pair shards")
    data_dir = epath.Path(config.data.dir)
    _require(_probe("data.dir", config.data.dir, data_dir.is_dir), "data.dir",
             f"{config.data.dir!r} is not a directory of tile-pair shards")
    pattern = f"xmag_pairs-{config.data.split}.array_record-*"
    _require(_probe("data.dir", config.data.dir, lambda: any(data_dir.glob(pattern))), "data.dir",
             f"{config.data.dir!r} has no shards for split {config.data.split!r} (expected files {pattern})")


def check_config(config: ml_collections.ConfigDict) -> None:
    """All checks that need no devices."""
    check_schema(config)
    check_values(config)
    check_files(config)


def check_against_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch splits evenly over data-parallel devices, processes and accumulation steps."""
    data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    per_update = data_parallel * config.optim.grad_accum
    _require(config.batch_size % per_update == 0, "batch_size",
             f"{config.batch_size} pairs does not divide by data-parallel size {data_parallel} (mesh data x fsdp)"
             f" x optim.grad_accum {config.optim.grad_accum} = {per_update}")
    _require(config.batch_size % jax.process_count() == 0, "batch_size",
             f"{config.batch_size} pairs does not divide by the {jax.process_count()} processes")
