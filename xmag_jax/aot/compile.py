"""Compile of the distillation train step for a Cloud TPU topology on a host without a TPU, and its report.

`compile_step(config, topo)` builds the training mesh over libtpu's compile-only devices for the topology
(`xmag_jax.topologies`) and the train step of `xmag_jax.distill.step.make_trainer` (the one `jit` the train
loop runs) on abstract state, lowers and compiles it with XLA:TPU, and returns a `Report` per chip: HBM
(arguments, outputs, temporaries, total against the chip's HBM; bytes), compiled FLOPs (XLA cost analysis),
model FLOPs (architecture), projected step time and pairs/s/chip at the chip's bf16 peak times an assumed
MFU, and XLA's own time estimate. `compile_within_hbm`, `Memory` and `cost` are the pieces any compile-only
report uses (`xmag_jax.finetune.aot` too). The command line is `xmag_jax.aot.cli`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from xmag_jax import sharding, topologies
from xmag_jax.config import XMAG_NUM_PAIRS
from xmag_jax.topologies import GiB, Topology

DEFAULT_MFU = 0.5
_OOM_RE = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                     r"\(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Report:
    """One compile of the step. Bytes are per chip; FLOPs per step (whole slice) unless named per chip."""

    config_name: str
    topology: dict[str, Any]
    mesh: dict[str, int]
    global_batch: int
    knobs: dict[str, Any]
    fits: bool
    compiled: bool
    hbm_bytes: int  # the chip's HBM as XLA:TPU allocates it (libtpu's limit)
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None  # arguments + outputs - aliased (donated) + temporaries + code
    argument_groups: dict[str, int] = dataclasses.field(default_factory=dict)  # per chip, from the shardings
    compiled_flops_per_chip: float | None = None
    model_flops: float = 0.0
    model_flops_parts: dict[str, float] = dataclasses.field(default_factory=dict)
    xla_seconds: float | None = None  # XLA:TPU's estimated step time, when it gives one
    mfu: float = DEFAULT_MFU
    compile_seconds: float = 0.0
    error: str | None = None
    scanned_layers: bool = False  # student or teacher blocks under a scan: XLA's cost analysis counts a body once

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """Inverse of `to_json` (which adds derived values); fields added since the JSON was written get their
        defaults."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @property
    def num_chips(self) -> int:
        return int(self.topology["chips"])

    @property
    def batch_unit(self) -> int:
        """Global batches are multiples of this: data-parallel size (data x fsdp) x grad_accum."""
        return math.prod(self.mesh.values()) * int(self.knobs["optim.grad_accum"])

    @property
    def projected_step_seconds(self) -> float:
        return self.model_flops / (self.num_chips * self.topology["peak_bf16_tflops_per_chip"] * 1e12 * self.mfu)

    @property
    def pairs_per_second(self) -> float:
        return self.global_batch / self.projected_step_seconds

    @property
    def pairs_per_second_per_chip(self) -> float:
        return self.pairs_per_second / self.num_chips

    @property
    def epoch_hours(self) -> float:
        return XMAG_NUM_PAIRS / self.pairs_per_second / 3600

    @property
    def over_bytes(self) -> int:
        return (self.total_bytes or 0) - self.hbm_bytes

    def dominant_buffers(self, n: int = 3) -> list[tuple[str, int]]:
        """The largest per-chip buffers: argument groups, un-donated outputs and temporaries."""
        parts = dict(self.argument_groups)
        if self.temp_bytes is not None:
            parts["temporaries (activations, gradients, teacher outputs)"] = self.temp_bytes
        if self.output_bytes is not None and self.alias_bytes is not None:
            parts["outputs not donated"] = self.output_bytes - self.alias_bytes
        return sorted(parts.items(), key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(num_chips=self.num_chips, projected_step_seconds=self.projected_step_seconds,
                   pairs_per_second=self.pairs_per_second, pairs_per_second_per_chip=self.pairs_per_second_per_chip,
                   epoch_hours=self.epoch_hours, dominant_buffers=self.dominant_buffers())
        return out


def knobs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The memory/precision settings a pod run turns: teacher dtype and sharding, student remat, accumulation,
    scanned layers, and the augmented views per pair (each global-batch pair is `data.views` student and
    teacher inputs; the model FLOPs and the batch arguments count them)."""
    return {"teacher.dtype": config.teacher.dtype, "teacher.sharding": config.teacher.sharding,
            "student.dtype": config.student.dtype, "student.remat": bool(config.student.remat),
            "optim.grad_accum": int(config.optim.grad_accum), "mesh.fsdp": int(config.mesh.fsdp),
            "data.views": int(config.data.views), "student.scan_layers": bool(config.student.get("scan_layers")),
            "teacher.scan_layers": bool(config.teacher.get("scan_layers"))}


def _per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded `ShapeDtypeStruct`s (largest shard; no TPU tile padding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def argument_groups(trainer: Any, global_batch: int) -> dict[str, int]:
    """Per-chip bytes of the step's inputs by part, from the trainer's abstract trees and shardings."""
    state = trainer.abstract_state()
    params = state.params
    groups = {
        "teacher params": _per_chip_bytes(trainer.abstract_teacher_state()),
        "student params": _per_chip_bytes(params["student"]),
        "projector params": _per_chip_bytes(params) - _per_chip_bytes(params["student"]),
        "optimizer state": _per_chip_bytes(state.opt_state),
        "batch (uint8 images)": _per_chip_bytes(trainer.abstract_batch(global_batch)),
    }
    if state.ema is not None:
        groups["EMA student"] = _per_chip_bytes(state.ema)
    return groups


def oom_bytes(message: str) -> tuple[int, int] | None:
    """(required, available) bytes per chip from XLA:TPU's out-of-HBM message, or None."""
    m = _OOM_RE.search(message)
    if m is None:
        return None
    return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip bytes of a compiled program (`compiled.memory_analysis()`)."""

    argument: int
    output: int
    alias: int  # outputs that reuse a donated argument's buffer
    temp: int
    code: int

    @classmethod
    def of(cls, compiled: Any) -> Memory:
        mem = compiled.memory_analysis()
        return cls(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                   mem.temp_size_in_bytes, mem.generated_code_size_in_bytes)

    @property
    def total(self) -> int:
        """What the chip holds at once: arguments + outputs - aliased (donated) + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code


def cost(compiled: Any) -> tuple[float, float | None]:
    """(FLOPs per chip, XLA:TPU's estimated seconds or None) from the compiled program's cost analysis."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    seconds = float(analysis.get("optimal_seconds", -1.0))
    return float(analysis.get("flops", 0.0)), (seconds if seconds > 0 else None)


def compile_within_hbm(lower: Callable[[], Any]) -> tuple[Any | None, str | None, float]:
    """Lowers and compiles; returns (compiled, None, seconds), or (None, XLA's first message line, seconds)
    when XLA:TPU reports that the program does not fit the chip's HBM. Any other compile error raises."""
    start = time.perf_counter()
    try:
        return lower().compile(), None, time.perf_counter() - start
    except jax.errors.JaxRuntimeError as error:
        if not str(error).startswith("RESOURCE_EXHAUSTED"):
            raise
        return None, str(error).splitlines()[0], time.perf_counter() - start


def with_batch(config: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    with config.unlocked():
        config.batch_size = int(global_batch)
    return config


def batch_unit(config: ml_collections.ConfigDict, devices: list) -> int:
    """Global batches must be multiples of this: the data-parallel size of the config's mesh over `devices`
    times grad_accum."""
    return sharding.data_parallel_size(sharding.make_mesh(config.mesh, devices)) * int(config.optim.grad_accum)


def compile_step(config: ml_collections.ConfigDict, topo: Topology, *, global_batch: int | None = None,
                 mfu: float = DEFAULT_MFU, config_name: str = "", devices: list | None = None) -> Report:
    """Compiles the train step of `config` for `topo` at `global_batch` (default config.batch_size)."""
    from xmag_jax.distill import config_validation  # pylint: disable=g-import-not-at-top
    from xmag_jax.distill import step as step_lib

    devices = topologies.compile_devices(topo) if devices is None else devices
    config = with_batch(config, int(config.batch_size if global_batch is None else global_batch))
    # The train command's checks over this topology's chips; no files: nothing is read, the teacher stays abstract.
    config_validation.validate(config, num_devices=len(devices), files=False)
    mesh = sharding.make_mesh(config.mesh, devices)
    batch = int(config.batch_size)
    trainer = step_lib.make_trainer(config, mesh)
    step_flops = trainer.flops_per_step(batch)
    report = Report(
        config_name=config_name, topology=topo.describe(), mesh=dict(mesh.shape), global_batch=batch,
        knobs=knobs(config), fits=False, compiled=False, hbm_bytes=topo.chip.usable_hbm_bytes,
        argument_groups=argument_groups(trainer, batch), model_flops=step_flops.total,
        scanned_layers=bool(config.student.get("scan_layers") or config.teacher.get("scan_layers")),
        model_flops_parts={f.name: getattr(step_flops, f.name) for f in dataclasses.fields(step_flops)}, mfu=mfu)
    compiled, error, report.compile_seconds = compile_within_hbm(lambda: trainer.lower(batch))
    if compiled is None:
        oom = oom_bytes(error)
        if oom is None:
            raise RuntimeError(f"XLA:TPU out of HBM, in a message this report cannot read: {error}")
        report.total_bytes, report.hbm_bytes = oom
        report.error = error
        return report
    report.compiled = True
    mem = Memory.of(compiled)
    report.argument_bytes, report.output_bytes, report.alias_bytes = mem.argument, mem.output, mem.alias
    report.temp_bytes, report.code_bytes, report.total_bytes = mem.temp, mem.code, mem.total
    report.fits = report.total_bytes <= report.hbm_bytes
    report.compiled_flops_per_chip, report.xla_seconds = cost(compiled)
    return report


def fit_text(report: Report) -> str:
    total = report.total_bytes or 0
    verdict = "fits" if report.fits else f"DOES NOT FIT (over by {report.over_bytes / GiB:.2f} GiB)"
    return f"{total / GiB:6.2f} / {report.hbm_bytes / GiB:.2f} GiB per chip, {verdict}"


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP" if x >= 1e11 else f"{x / 1e9:.2f} GFLOP"


def _gib_list(parts: Any) -> str:
    return ", ".join(f"{k} {v / GiB:.3f} GiB" for k, v in parts)


def format_report(report: Report) -> str:
    """The report as text: topology and mesh, HBM per chip (what dominates when it does not fit), FLOPs,
    projections."""
    t = report.topology
    lines = [
        f"{report.config_name or 'config'} on {t['name']} ({t['topology']}, {t['slices']} slice(s), "
        f"{t['chips']} chips, {t['hosts']} hosts), mesh {report.mesh}, global batch {report.global_batch} pairs",
        "knobs: " + ", ".join(f"{k}={v}" for k, v in report.knobs.items()),
        f"HBM per chip: {fit_text(report)}",
    ]
    if report.compiled:
        lines.append("  " + _gib_list([("arguments", report.argument_bytes), ("outputs", report.output_bytes),
                                        ("of which donated", report.alias_bytes), ("temporaries", report.temp_bytes),
                                        ("code", report.code_bytes)]))
    else:
        lines.append(f"  XLA:TPU: {report.error}")
    lines.append("  arguments by part: " + _gib_list(report.argument_groups.items()))
    if not report.fits:
        lines.append("  dominant buffers: " + _gib_list(report.dominant_buffers()))
    parts = ", ".join(f"{k} {_flops(v)}" for k, v in report.model_flops_parts.items())
    lines.append(f"model FLOPs per step: {_flops(report.model_flops)} ({parts})")
    loops = [name for name, on in (("the grad_accum loop", report.knobs["optim.grad_accum"] > 1),
                                    ("the scanned layers", report.scanned_layers)) if on]
    loop = f"; XLA counts the body of {' and '.join(loops)} once" if loops else ""
    if report.compiled_flops_per_chip is not None:
        total = report.compiled_flops_per_chip * report.num_chips
        per_chip = _flops(report.compiled_flops_per_chip)
        lines.append(f"compiled FLOPs per step (XLA cost analysis): {_flops(total)} ({per_chip} per chip; "
                     f"{total / report.model_flops:.2f}x model{loop})")
    lines.append(f"projected at {report.mfu:.0%} MFU of {t['peak_bf16_tflops_per_chip']:.0f} TFLOP/s/chip: "
                 f"{report.projected_step_seconds * 1e3:.1f} ms/step, {report.pairs_per_second_per_chip:.2f} "
                 f"pairs/s/chip, {report.pairs_per_second:.0f} pairs/s, {report.epoch_hours:.2f} h per epoch of "
                 f"{XMAG_NUM_PAIRS / 1e6:.2f} M pairs")
    if report.xla_seconds is not None:
        lines.append(f"XLA:TPU estimate: {report.xla_seconds * 1e3:.1f} ms/step "
                     f"({report.global_batch / report.xla_seconds / report.num_chips:.2f} pairs/s/chip)"
                     + (" — loop bodies counted once: an underestimate" if loop else ""))
    lines.append(f"compile: {report.compile_seconds:.1f} s on this host")
    return "\n".join(lines)
