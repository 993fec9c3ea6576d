r"""Ahead-of-time compile of the distillation step for a Cloud TPU topology, on a host without a TPU.

    python -m xmag_jax.aot --config configs/uni2h_vits14.py --topology v5p-256 [--global_batch 2048] \
        [--slices 2] [--mfu 0.5] [--find_batch] [--require_fit] [--json report.json] [--config.KEY=VALUE]
    python -m xmag_jax.aot --docs docs/aot.md      # regenerate the report tables (xmag_jax/aot_docs.py)

Builds the training mesh over libtpu's compile-only devices for the topology (`xmag_jax.topologies`) and
the train step of `xmag_jax.distill.step.make_trainer` (the one `jit` the train loop runs) on abstract
state, lowers and compiles it with XLA:TPU, and reports per chip: HBM (arguments, outputs, temporaries,
total against the chip's HBM; bytes), compiled FLOPs (XLA cost analysis), model FLOPs (architecture),
projected step time and pairs/s/chip at the chip's bf16 peak times an assumed MFU, and XLA's own time
estimate. `--find_batch` searches the largest global batch that compiles within HBM (bracketing, then
narrowing, over multiples of the data-parallel size x grad_accum). Exit status 3 with `--require_fit`
when the step does not fit; 2 for bad input (unknown topology, config error).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from xmag_jax import cli, errors, sharding, topologies
from xmag_jax.topologies import GiB, Topology

DEFAULT_MFU = 0.5
XMAG_NUM_PAIRS = 3_490_000  # tile pairs in one XMAG epoch (arXiv 2509.23097), as xmag_jax.config
NOT_FIT_EXIT = 3
PROG = "python -m xmag_jax.aot"
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
        """Inverse of `to_json` (which adds derived values)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

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
    and the augmented views per pair (each global-batch pair is `data.views` student and teacher inputs; the
    model FLOPs and the batch arguments count them)."""
    return {"teacher.dtype": config.teacher.dtype, "teacher.sharding": config.teacher.sharding,
            "student.dtype": config.student.dtype, "student.remat": bool(config.student.remat),
            "optim.grad_accum": int(config.optim.grad_accum), "mesh.fsdp": int(config.mesh.fsdp),
            "data.views": int(config.data.views)}


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


def _oom_bytes(message: str) -> tuple[int, int] | None:
    m = _OOM_RE.search(message)
    if m is None:
        return None
    return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


def with_batch(config: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    with config.unlocked():
        config.batch_size = int(global_batch)
    return config


def batch_unit(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Global batches must be multiples of this: the data-parallel size times grad_accum."""
    return sharding.data_parallel_size(mesh) * int(config.optim.grad_accum)


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
    start = time.perf_counter()
    try:
        compiled = trainer.lower(batch).compile()
    except jax.errors.JaxRuntimeError as error:
        report.compile_seconds = time.perf_counter() - start
        message = str(error)
        oom = _oom_bytes(message)
        if not message.startswith("RESOURCE_EXHAUSTED") or oom is None:
            raise
        report.total_bytes, report.hbm_bytes = oom
        report.error = message.splitlines()[0]
        return report
    report.compile_seconds = time.perf_counter() - start
    report.compiled = True
    mem = compiled.memory_analysis()
    report.argument_bytes = mem.argument_size_in_bytes
    report.output_bytes = mem.output_size_in_bytes
    report.alias_bytes = mem.alias_size_in_bytes
    report.temp_bytes = mem.temp_size_in_bytes
    report.code_bytes = mem.generated_code_size_in_bytes
    report.total_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    report.fits = report.total_bytes <= report.hbm_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.compiled_flops_per_chip = float(cost.get("flops", 0.0))
    seconds = float(cost.get("optimal_seconds", -1.0))
    report.xla_seconds = seconds if seconds > 0 else None
    return report


def find_batch(config: ml_collections.ConfigDict, topo: Topology, *, mfu: float = DEFAULT_MFU, config_name: str = "",
               max_batch: int | None = None, max_tries: int = 10, initial: Report | None = None,
               log: Callable[[str], None] = print) -> tuple[Report | None, list[Report]]:
    """Largest global batch (a multiple of `batch_unit`) whose step fits HBM, by compiling.

    Starts at the config's batch, then brackets and narrows the largest fit: each next try is where the
    per-chip HBM of the tries so far, taken as linear in the batch (fixed state + per-pair activations),
    reaches the chip's HBM, kept strictly inside the bracket (doubling/halving at most x16 while one
    side is open; bisection when the line points at a batch already tried). Ends when the largest fit
    and the smallest misfit are one unit apart. `initial`: a report of this config and topology already
    compiled (counts as the first try). Returns (best fitting report or None, every try).
    """
    devices = topologies.compile_devices(topo)
    unit = batch_unit(config, sharding.make_mesh(config.mesh, devices))
    max_batch = max_batch or unit * 4096
    tries: dict[int, Report] = {}
    lo, hi = 0, None  # largest fitting batch, smallest misfit

    batch = min(max_batch, max(unit, int(config.batch_size) // unit * unit))
    while len(tries) < max_tries:
        if initial is not None and not tries:
            report = initial
            batch = report.global_batch
        else:
            report = compile_step(config, topo, global_batch=batch, mfu=mfu, config_name=config_name, devices=devices)
        tries[batch] = report
        log(f"  try global batch {batch:6d} ({batch / topo.num_chips:g} per chip): {_fit_text(report)}  "
            f"[{report.compile_seconds:.0f} s compile]")
        if report.fits:
            lo = max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)
        low, high = lo + unit, (hi - unit if hi is not None else max_batch)
        if low > high:
            break
        guess = batch_at_hbm(tries, lo, hi, report.hbm_bytes)
        guess = min(guess, 16 * lo) if hi is None else guess
        guess = max(guess, hi // 16) if not lo and hi is not None else guess
        batch = min(high, max(low, int(guess) // unit * unit))
        if batch in tries:
            batch = max(low, (low + high) // 2 // unit * unit)
    ordered = [tries[b] for b in sorted(tries)]
    return (tries[lo] if lo else None), ordered


def batch_at_hbm(tries: dict[int, Report], lo: int, hi: int | None, hbm: int) -> float:
    """Batch where the per-chip total of the tries, linear in the batch, reaches `hbm`."""
    if lo and hi is not None:
        (b1, r1), (b2, r2) = (lo, tries[lo]), (hi, tries[hi])
    elif len(tries) >= 2:
        (b1, r1), (b2, r2) = sorted(tries.items())[-2:] if hi is None else sorted(tries.items())[:2]
    else:  # one try: its state (arguments other than the batch) is fixed, the rest grows with the batch
        (b2, r2), = tries.items()
        fixed = sum(v for k, v in r2.argument_groups.items() if not k.startswith("batch"))
        b1, r1 = 0, dataclasses.replace(r2, total_bytes=fixed)
    slope = (r2.total_bytes - r1.total_bytes) / (b2 - b1)
    if slope <= 0:
        return 2 * b2 if r2.fits else b2 / 2
    return b2 + (hbm - r2.total_bytes) / slope


def _fit_text(report: Report) -> str:
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
        f"HBM per chip: {_fit_text(report)}",
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


def _define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).", flag_values=fv,
                                    lock_config=False)
    flags.DEFINE_string("topology", None, "TPU slice: v5p-256, v5e-256, v6e-256, v4-128 ... (or libtpu's v5p:4x4x8).",
                        flag_values=fv)
    flags.DEFINE_integer("slices", 1, "Identical slices joined over the data-centre network (multislice).",
                         flag_values=fv)
    flags.DEFINE_integer("global_batch", None, "Global batch in pairs (default: config.batch_size).", flag_values=fv)
    flags.DEFINE_float("mfu", DEFAULT_MFU, "Assumed model FLOPs utilisation for the projected step time.",
                       flag_values=fv)
    flags.DEFINE_bool("find_batch", False, "Search the largest global batch that fits (compiles several times).",
                      flag_values=fv)
    flags.DEFINE_integer("max_batch", None, "Upper bound for --find_batch (default: 4096 x the batch unit).",
                         flag_values=fv)
    flags.DEFINE_bool("teacher_cache", False, "Also compile the student-only step of training from a teacher-target "
                      "cache (data.teacher_cache: targets in the batch, no teacher) and report it after the live one.",
                      flag_values=fv)
    flags.DEFINE_bool("require_fit", False, f"Exit {NOT_FIT_EXIT} when the step does not fit the chip's HBM.",
                      flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the report (and every --find_batch try) as JSON here.",
                        flag_values=fv)
    flags.DEFINE_string("docs", None, "Regenerate the markdown report (e.g. docs/aot.md) and exit.", flag_values=fv)
    flags.DEFINE_bool("rerender", False, "With --docs: rewrite the page from its JSON (docs/aot.json), no compiling.",
                      flag_values=fv)
    flags.DEFINE_enum("docs_part", "all", ["all", "rows", "knobs"], "With --docs: compile only the table rows or "
                      "only the knob variants (two processes can share the page).", flag_values=fv)
    flags.DEFINE_list("docs_topologies", None, "With --docs: table rows for these topologies only.", flag_values=fv)
    flags.DEFINE_list("docs_configs", None, "With --docs: table rows for these config files only.", flag_values=fv)
    flags.DEFINE_bool("docs_resume", False, "With --docs: keep the compiles the page's JSON holds, add the missing.",
                      flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    _define_flags(fv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(cli.Command(PROG, _define_flags, doc=__doc__).help())
        return 0
    rest = errors.parse_flags(fv, [argv[0], *[
        a.replace("--find-batch", "--find_batch").replace("--require-fit", "--require_fit")
        .replace("--global-batch", "--global_batch").replace("--max-batch", "--max_batch") for a in argv[1:]]])
    if len(rest) > 1:
        raise errors.UserError(f"unexpected arguments {rest[1:]}")
    if fv.docs:
        from xmag_jax import aot_docs  # pylint: disable=g-import-not-at-top
        if fv.rerender:
            return aot_docs.rerender(fv.docs, mfu=fv.mfu)
        return aot_docs.main(fv.docs, mfu=fv.mfu, part=fv.docs_part, resume=fv.docs_resume,
                             only_topologies=tuple(fv.docs_topologies or ()),
                             only_configs=tuple(fv.docs_configs or ()))
    if fv.config is None or fv.topology is None:
        print("error: --config and --topology are required (or --docs PATH)", file=sys.stderr)
        return 2
    try:
        topo = topologies.parse(fv.topology, slices=fv.slices)
    except topologies.UnknownTopologyError as error:
        errors.report(error, PROG)
        return errors.EXIT_USER_ERROR
    config = fv.config
    overrides = config_flags.get_override_values(fv["config"])
    name = config_flags.get_config_filename(fv["config"]) + "".join(f" --config.{k}={v}" for k, v in overrides.items())
    tries: list[Report] = []
    try:
        if fv.find_batch:
            print(f"searching the largest global batch for {name} on {topo.name} x{topo.slices}:", flush=True)
            report, tries = find_batch(config, topo, mfu=fv.mfu, config_name=name, max_batch=fv.max_batch,
                                       log=lambda s: print(s, flush=True))
            if report is None:
                report = tries[0]
                print("no batch fits; the smallest try:")
        else:
            report = compile_step(config, topo, global_batch=fv.global_batch, mfu=fv.mfu, config_name=name)
        if fv.teacher_cache:
            print(format_report(report), flush=True)
            cached = copy.deepcopy(config)
            with cached.unlocked():
                cached.data.teacher_cache = "CACHE"  # compile-only: no cache is read
            report = compile_step(cached, topo, global_batch=report.global_batch, mfu=fv.mfu,
                                  config_name=f"{name} --config.data.teacher_cache=CACHE")
    except ValueError as error:  # ConfigError included: the message names the config key
        errors.report(error, PROG)
        return errors.EXIT_USER_ERROR
    print(format_report(report))
    if fv.json:
        from etils import epath  # pylint: disable=g-import-not-at-top
        payload = {"report": report.to_json(), "tries": [t.to_json() for t in tries]}
        path = epath.Path(fv.json)
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)
    if fv.require_fit and not report.fits:
        print(f"error: does not fit: {report.total_bytes / GiB:.2f} GiB per chip needed, "
              f"{report.hbm_bytes / GiB:.2f} GiB available", file=sys.stderr)
        return NOT_FIT_EXIT
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
