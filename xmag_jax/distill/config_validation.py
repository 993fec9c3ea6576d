"""Checks a distillation config before anything is compiled; every error names the config key at fault.

`validate(config, num_devices=...)` is the one entry point every command calls first: schema, value
ranges (the `RANGES` table), model geometry (`distill.step.validate`), mesh and batch divisibility, files.
Every problem is one `errors.ConfigError`, which the command lines print as one line (exit status 2).
The parts (`check_schema`, `check_values`, `check_files`, `check_batch`) are there for tools that need
fewer checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from xmag_jax import atomic, sharding
from xmag_jax import config as schema
from xmag_jax.distill import losses
from xmag_jax.distill.projectors import PROJECTOR_NORMS
from xmag_jax.errors import ConfigError

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


def unknown_key(key: str) -> str:
    """`config key 'optim.weight_decy' is not a known key (did you mean 'optim.weight_decay'?); ...`."""
    close = difflib.get_close_matches(key, flatten(schema.base_config()), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"config key {key!r} is not a known key{hint}; the schema is xmag_jax/config.py"


def check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key of `config` is in `configs.schema.base_config()` and vice versa."""
    known = flatten(schema.base_config())
    given = flatten(config)
    problems = []
    problems += [unknown_key(key) for key in sorted(set(given) - set(known))]
    for key in sorted(set(known) - set(given)):
        problems.append(f"config key {key!r} is missing; every key of xmag_jax/config.py must be set")
    if problems:
        raise ConfigError("\n".join(problems))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or half-open interval of finite numbers; `also` lists special values outside it (-1, None)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[Any, ...] = ()

    def __contains__(self, value: Any) -> bool:
        if value in self.also and type(value) is not bool:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return " or ".join([text, *(repr(a) for a in self.also)])


_POSITIVE, _AT_LEAST_1, _NON_NEGATIVE = Range(0, lo_open=True), Range(1), Range(0)
_FRACTION, _DECAY = Range(0, 1), Range(0, 1, hi_open=True)

# Every numeric key of xmag_jax/config.py and the values it may take (finite numbers only).
RANGES: dict[str, Range] = {
    "seed": _NON_NEGATIVE,
    "total_steps": _AT_LEAST_1,
    "batch_size": _AT_LEAST_1,
    "student.layer_scale_init": Range(0, lo_open=True, also=(None,)),
    "data.worker_count": _NON_NEGATIVE,
    "data.prefetch_buffer": _AT_LEAST_1,
    "data.max_bad_record_fraction": _DECAY,
    "data.views": _AT_LEAST_1,
    "loss.global_weight": _NON_NEGATIVE,
    "loss.global_smooth_l1_weight": _NON_NEGATIVE,
    "loss.tile_weight": _NON_NEGATIVE,
    "loss.token_weight": _NON_NEGATIVE,
    "loss.projector_hidden": _AT_LEAST_1,
    "loss.center_momentum": _DECAY,
    "optim.lr": _POSITIVE,
    "optim.min_lr_ratio": _FRACTION,
    "optim.warmup_steps": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.b1": _DECAY,
    "optim.b2": _DECAY,
    "optim.clip_norm": _POSITIVE,
    "optim.grad_accum": _AT_LEAST_1,
    "optim.ema_decay": _DECAY,
    "mesh.data": Range(1, also=(-1,)),
    "mesh.fsdp": Range(1, also=(-1,)),
    "log_every": _AT_LEAST_1,
    "peak_tflops_per_device": Range(0, lo_open=True, also=(None,)),
    "checkpoint.every": _AT_LEAST_1,
    "checkpoint.keep": _AT_LEAST_1,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "loss.mode": losses.MODES,
    "loss.projector_norm": PROJECTOR_NORMS,
    "teacher.sharding": TEACHER_SHARDINGS,
    "teacher.dtype": DTYPES,
    "student.dtype": DTYPES,
}


def check_values(config: ml_collections.ConfigDict) -> None:
    """Every value in its range (`RANGES`) or among its choices (`CHOICES`)."""
    values = flatten(config)
    for key, allowed in RANGES.items():
        if key in values:
            _require(values[key] in allowed, key, f"must be {allowed}, got {values[key]!r}")
    for key, choices in CHOICES.items():
        if key in values:
            _require(values[key] in choices, key, f"must be one of {choices}, got {values[key]!r}")


def _probe(key: str, what: str, probe):
    """Run a file-system check, turning storage errors (no credentials, no such bucket) into a ConfigError."""
    try:
        return probe()
    except Exception as error:  # noqa: BLE001 - any storage failure is reported against the key
        raise ConfigError(f"{key}: cannot read {what!r} ({type(error).__name__}: {error})") from error


def check_files(config: ml_collections.ConfigDict) -> None:
    """The teacher checkpoint and the data shards exist, and a `student.init` is a model checkpoint of
    `student.name`'s architecture."""
    from xmag_jax.distill import step as step_lib  # pylint: disable=g-import-not-at-top (step imports us)

    if config.student.get("init"):
        student, _ = step_lib.archs(config)
        step_lib.check_checkpoint_arch("student.init", config.student.init, student, "student.name")
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
    for key in ("data.dir", "data.teacher_cache"):
        value = config.data.dir if key == "data.dir" else config.data.teacher_cache
        _require(not (value and atomic.is_object_store(value)), key,
                 f"{value!r} is on an object store: ArrayRecord shards are read as local files; mount the bucket "
                 "with gcsfuse and give the mount path, e.g. /gcs/BUCKET/DIR (launch/README.md)")
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


def check_batch(config: ml_collections.ConfigDict, data_parallel: int, process_count: int = 1) -> None:
    """The global batch splits evenly over the `data_parallel` devices (mesh data x fsdp), the processes and
    the accumulation steps."""
    per_update = data_parallel * config.optim.grad_accum
    _require(config.batch_size % per_update == 0, "batch_size",
             f"{config.batch_size} pairs does not divide by data-parallel size {data_parallel} (mesh data x fsdp)"
             f" x optim.grad_accum {config.optim.grad_accum} = {per_update}")
    _require(config.batch_size % process_count == 0, "batch_size",
             f"{config.batch_size} pairs does not divide by the {process_count} processes")


def check_against_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """`check_batch` for a built mesh and this job's processes."""
    check_batch(config, mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1), jax.process_count())


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1,
             files: bool = True) -> None:
    """The one check of a config, run by every command before anything is compiled; raises `ConfigError`.

    Schema (unknown keys with a suggestion, missing keys), value ranges and choices, the model geometry
    (`distill.step.validate`: token grids that must divide), the mesh over `num_devices` devices (fsdp and data
    sizes that divide them) and the batch over it and the `process_count` processes, and, with `files`, that
    `teacher.checkpoint`, `student.init` and `data.dir` exist (`aot` compiles without reading them).
    """
    from xmag_jax.distill import step as step_lib  # pylint: disable=g-import-not-at-top (step imports us)

    check_schema(config)
    check_values(config)
    step_lib.validate(config)
    data, fsdp = sharding.mesh_shape(config.mesh, num_devices)
    check_batch(config, data * fsdp, process_count)
    if files:
        check_files(config)
