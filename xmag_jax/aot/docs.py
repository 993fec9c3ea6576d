"""Writes docs/aot.md, the AOT compile reports of the real-size configs on TPU v5e/v5p/v6e-256, by compiling.

    python -m xmag_jax.aot --docs docs/aot.md [--nosearch] [--rows 'uni2h_vits14/*,knobs/*'] [--resume]

Every line of the page is a `Case` with an id (`uni2h_vits14/v5p-256`, `knobs/fp32_teacher`): the main table
(each teacher → student config on each topology, XMAG's recipe on v5p-256 and v6e-256) and the
memory/precision knob variants of one combination (scanned layers off among them). Each case compiles once at
its page batch (the config's, rounded down to a multiple of the batch unit); the table rows then search their
largest batch (`search.find_batch`, at most `MAX_TRIES` compiles) unless `--nosearch`, and show the one-compile
estimate instead. Results go to a JSON beside the page (`aot.json`), with the date, versions and command of
each compile; the page is rewritten from it after every compile, so an interrupted run leaves what it finished,
and several processes (different `--rows`) can fill one page. `--resume` keeps the cases the JSON holds.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import fcntl
import fnmatch
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from xmag_jax import atomic, errors, topologies
from xmag_jax.aot import compile as compile_lib
from xmag_jax.aot import search
from xmag_jax.aot.compile import DEFAULT_MFU, Report
from xmag_jax.config import XMAG_NUM_PAIRS
from xmag_jax.topologies import GiB

MAX_TRIES = 4
TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (  # config file, label, topologies
    ("configs/uni2h_vits14.py", "UNI2-h → ViT-S/14", ("v5e-256", "v5p-256", "v6e-256")),
    ("configs/virchow2_vits14.py", "Virchow2 → ViT-S/14", ("v5e-256", "v5p-256", "v6e-256")),
    ("configs/hoptimus1_vits14.py", "H-optimus-1 → ViT-S/14", ("v5e-256", "v5p-256", "v6e-256")),
    ("configs/xmag_uni2h_vitb14.py", "UNI2-h → ViT-B/14, XMAG recipe (2 views, EMA)", ("v5p-256", "v6e-256")),
)
KNOB_CONFIG, KNOB_TOPOLOGY = "configs/uni2h_vits14.py", "v5p-256"
KNOB_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (  # id suffix, label, --config.KEY=VALUE overrides
    ("fp32_teacher", "fp32 teacher", {"teacher.dtype": "float32"}),
    ("student_remat", "student remat", {"student.remat": True}),
    ("teacher_fsdp4", "teacher FSDP over fsdp=4", {"teacher.sharding": "fsdp", "mesh.fsdp": 4}),
    ("grad_accum4", "grad_accum 4", {"optim.grad_accum": 4}),
    ("unscanned", "layers unrolled (no scan)", {"student.scan_layers": False, "teacher.scan_layers": False}),
    ("unscanned_teacher", "teacher unrolled, student scanned", {"teacher.scan_layers": False}),
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One compiled line of the page: `config` (+ `overrides`, dotted keys) on `topology`."""

    id: str
    label: str
    config: str
    topology: str
    overrides: tuple[tuple[str, Any], ...] = ()
    searched: bool = True  # a main-table row: its largest batch is searched unless --nosearch

    @property
    def config_name(self) -> str:
        return self.config + "".join(f" --config.{k}={v}" for k, v in self.overrides)


def _stem(path: str) -> str:
    return epath.Path(path).stem


def cases() -> list[Case]:
    """Every case of the page, in page order (the knob base is the main-table row it equals)."""
    table = [Case(f"{_stem(c)}/{t}", label, c, t) for c, label, tops in TABLE for t in tops]
    knobs = [Case(f"knobs/{suffix}", label, KNOB_CONFIG, KNOB_TOPOLOGY, tuple(overrides.items()), searched=False)
             for suffix, label, overrides in KNOB_VARIANTS]
    return table + knobs


def load_config(path: str, overrides: tuple[tuple[str, Any], ...] = ()) -> ml_collections.ConfigDict:
    """The config file as `--config=path --config.KEY=VALUE ...` gives it (ml_collections' config_flags)."""
    argv = ["aot", f"--config={path}", *(f"--config.{k}={v}" for k, v in overrides)]
    fv = flags.FlagValues()  # the override flags are defined from the argv the config flag is given
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=argv)
    errors.parse_flags(fv, argv)
    return fv.config


def page_batch(config: ml_collections.ConfigDict, topo: topologies.Topology) -> int:
    """The config's global batch rounded down to a multiple of the batch unit on `topo` (at least one unit)."""
    unit = compile_lib.batch_unit(config, topologies.compile_devices(topo))
    return max(unit, int(config.batch_size) // unit * unit)


@dataclasses.dataclass
class Result:
    """What a case compiled: `tries` (batch ascending; one unless searched), the first at `batch`."""

    case: Case
    batch: int
    tries: list[Report]
    searched: bool
    provenance: dict[str, str]  # date, versions, command

    @property
    def at_batch(self) -> Report:
        return next(t for t in self.tries if t.global_batch == self.batch)

    @property
    def best(self) -> Report | None:
        fitting = [t for t in self.tries if t.fits]
        return max(fitting, key=lambda t: t.global_batch) if fitting else None

    def misfit_above(self) -> int | None:
        lo = self.best.global_batch if self.best else 0
        above = [t.global_batch for t in self.tries if not t.fits and t.global_batch > lo]
        return min(above) if above else None

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "searched": self.searched, "provenance": self.provenance,
                "tries": [t.to_json() for t in self.tries]}


def _gib(x: int | None) -> str:
    return "—" if x is None else f"{x / GiB:.2f}"


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _mesh(r: Report) -> str:
    return "×".join(f"{k} {v}" for k, v in r.mesh.items())


def _max_batch_cell(result: Result) -> str:
    unit = result.at_batch.batch_unit
    if not result.searched:  # where one compile's HBM, linear in the batch, meets the chip's
        r = result.at_batch
        lo, hi = (r.global_batch, None) if r.fits else (0, r.global_batch)
        estimate = int(search.batch_at_hbm({r.global_batch: r}, lo, hi, r.hbm_bytes)) // unit * unit
        return f"≈ {estimate} ({estimate / r.num_chips:g}/chip; estimate)" if estimate > 0 else "none fits (estimate)"
    if result.best is None:
        return "none fits"
    b = result.best.global_batch
    hi = result.misfit_above()
    per_chip = b / result.best.num_chips
    if hi is None:
        return f"≥ {b} ({per_chip:g}/chip; largest tried)"
    bracket = "" if hi - b <= unit else f", < {hi}"
    return f"{b}{bracket} ({per_chip:g}/chip)"


def _provenance_lines(results: list[Result], command_now: str) -> list[str]:
    """One line per (date, versions, command): which cases it compiled, and whether their layers were scanned."""
    groups: dict[tuple[str, str, str], list[Result]] = collections.defaultdict(list)
    for result in results:
        p = result.provenance
        groups[(p["date"], p["versions"], p["command"])].append(result)
    if not groups:
        return [f"- nothing compiled yet (`{command_now}`)."]
    lines = []
    for (date, versions, command), group in sorted(groups.items()):
        ids = ", ".join(f"`{r.case.id}`" for r in group)
        what = "every case" if len(groups) == 1 else f"{len(group)} case{'s' * (len(group) > 1)} ({ids})"
        scanned = {t.scanned_layers for r in group for t in r.tries}
        layers = {frozenset({True}): "layers scanned", frozenset({False}): "layers unrolled"}.get(
            frozenset(scanned), "layers scanned unless the variant says otherwise")
        lines.append(f"- {what}: `{command}` on {date}, {versions}; {layers}.")
    return lines


def render(results: list[Result], failed: dict[str, str], mfu: float, command_now: str) -> str:
    """The whole page from what the JSON holds; cases not compiled yet (or failed) are named in their rows."""
    by_id = {r.case.id: r for r in results}
    all_cases = cases()
    lines = [
        "# Ahead-of-time TPU compile reports",
        "",
        "Made by `python -m xmag_jax.aot --docs docs/aot.md` (`xmag_jax/aot/docs.py`; `--nosearch`: one compile "
        "per row, `--rows PATTERNS`: only those case ids, `--resume`: keep what `docs/aot.json` holds) with "
        f"libtpu compile-only devices on a CPU host ({platform.machine()}). Every number comes from compiling the "
        "train step of `xmag_jax/distill/step.py` (the one `jit` the train loop runs) for the topology with "
        "XLA:TPU; nothing ran on a TPU. The real-size configs scan their layers (`scan_layers`); the **compiled** "
        "column dates each row, and the code and versions of each date are:",
        "",
        *_provenance_lines(results, command_now),
        "",
        "- **global batch**: the config's, rounded down to a multiple of the data-parallel size × grad_accum "
        "(XMAG's 1152 pairs on the 256 chips of a v6e-256 become 1024).",
        "- **HBM/chip**: arguments + outputs − donated + temporaries + code, per chip, from "
        "`compiled.memory_analysis()`, against what XLA:TPU may allocate on the chip (v5e 15.75, v5p 95.73, "
        "v6e 31.24 GiB). When the compile itself runs out of HBM, the total is XLA's requirement from its error.",
        f"- **max batch**: `search.find_batch`, at most {MAX_TRIES} compiles per row; \"< N\" is the smallest batch "
        "tried that did not fit when the search stopped before narrowing to one batch unit. \"≈ N (estimate)\": "
        "not searched (`--nosearch`); where the one compile's HBM, taken as fixed state + a part linear in the "
        "batch, reaches the chip's (the search's first guess; optimistic by the temporaries that do not grow with "
        "the batch).",
        f"- **pairs/s**: projected at {mfu:.0%} MFU of the chip's bf16 peak (v5e 197, v5p 459, v6e 918 TFLOP/s) "
        "from the model FLOPs of one step (`xmag_jax/distill/flops.py`: teacher forward on 16 tiles per view, "
        "student forward+backward, projectors; every view of a pair counted); it does not depend on the batch. "
        "**XLA est.** is XLA:TPU's own step-time estimate (`cost_analysis()['optimal_seconds']`) at the row's "
        "batch, when it gives one and no layers are scanned (it counts a loop body once).",
        f"- **epoch**: {XMAG_NUM_PAIRS / 1e6:.2f} M pairs at the projected pairs/s.",
        "",
        "| teacher → student | topology | mesh | global batch | fits, HBM/chip (GiB) | max global batch | "
        "HBM/chip at max (GiB) | pairs/s (pairs/s/chip) | XLA est. pairs/s | epoch | compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = [c for c in all_cases if c.searched]
    for case in table:
        result = by_id.get(case.id)
        if result is None:
            note = f"failed: {failed[case.id]}" if case.id in failed else "not compiled yet"
            lines.append(f"| {case.label} | {case.topology} | {note} |  |  |  |  |  |  |  |  |")
            continue
        r = result.at_batch
        fit = "fits" if r.fits else f"**no** (+{r.over_bytes / GiB:.2f})"
        xla = f"{r.global_batch / r.xla_seconds:.0f}" if r.xla_seconds and not r.scanned_layers else "—"
        best = result.best if result.searched else None
        lines.append(
            f"| {case.label} | {r.topology['name']} | {_mesh(r)} | {r.global_batch} | {fit}, {_gib(r.total_bytes)} / "
            f"{r.hbm_bytes / GiB:.2f} | {_max_batch_cell(result)} | {_gib(best.total_bytes if best else None)} | "
            f"{r.pairs_per_second:.0f} ({r.pairs_per_second_per_chip:.1f}) | {xla} | {_duration(r.epoch_hours)} | "
            f"{result.provenance['date']} |")
    lines += ["", "## What dominates HBM (per chip, at the row's global batch)", ""]
    for case in table:
        if case.id in by_id:
            r = by_id[case.id].at_batch
            parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in r.dominant_buffers(4))
            lines.append(f"- {case.label} on {r.topology['name']}: {parts}")
    base_case = next(c for c in table if (c.config, c.topology) == (KNOB_CONFIG, KNOB_TOPOLOGY))
    base = by_id[base_case.id].at_batch if base_case.id in by_id else None
    lines += ["", f"## Memory/precision knobs: {KNOB_CONFIG} on {KNOB_TOPOLOGY}, global batch "
              f"{base.global_batch if base else '(as configured)'}", "",
              "| variant | knobs | fits | HBM/chip (GiB) | arguments | temporaries | code | compiled TFLOP/step | "
              "model TFLOP/step | compile (s) | compiled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, case in [("as configured", base_case)] + [(c.label, c) for c in all_cases if c.id.startswith("knobs/")]:
        if case.id not in by_id:
            note = f"failed: {failed[case.id]}" if case.id in failed else "not compiled yet"
            lines.append(f"| {label} | {note} |  |  |  |  |  |  |  |  |  |")
            continue
        r = by_id[case.id].at_batch
        flops = f"{r.compiled_flops_per_chip * r.num_chips / 1e12:.0f}" if r.compiled_flops_per_chip else "—"
        changed = {k: v for k, v in r.knobs.items() if base is None or r is base or base.knobs.get(k) != v}
        lines.append(f"| {label} | {', '.join(f'{k}={v}' for k, v in changed.items())} | "
                     f"{'yes' if r.fits else 'no'} | {_gib(r.total_bytes)} | {_gib(r.argument_bytes)} | "
                     f"{_gib(r.temp_bytes)} | {_gib(r.code_bytes)} | {flops} | {r.model_flops / 1e12:.0f} | "
                     f"{r.compile_seconds:.0f} | {by_id[case.id].provenance['date']} |")
    lines += ["", "XLA's cost analysis counts the body of a loop once: with `optim.grad_accum` > 1 (micro-batches in a "
              "`lax.scan`) or scanned layers its compiled FLOPs are not the step's. Compile times are wall seconds on "
              "the host that compiled the row, and vary with its load."]
    seconds = [t.compile_seconds for r in results for t in r.tries]
    if seconds:
        lines += ["", f"Compile time on this host: {len(seconds)} compiles, "
                  f"{min(seconds):.0f}–{max(seconds):.0f} s each (median {sorted(seconds)[len(seconds) // 2]:.0f} s)."]
    return "\n".join(lines) + "\n"


def _write(path: epath.Path, text: str) -> None:
    with atomic.target(path) as tmp:
        tmp.write_text(text)


def json_path(page: epath.Path) -> epath.Path:
    """The page's data, beside it: `docs/aot.md` -> `docs/aot.json`."""
    return page.parent / f"{page.stem}.json"


def load(page: epath.Path, mfu: float) -> tuple[list[Result], dict[str, str]]:
    """The results and failures the page's JSON holds, for the cases the page still has, at `mfu`."""
    path = json_path(page)
    saved = json.loads(path.read_text()) if path.exists() else {}
    known = {c.id: c for c in cases()}
    results = [Result(known[i], r["batch"], [dataclasses.replace(Report.from_json(t), mfu=mfu) for t in r["tries"]],
                      r["searched"], r["provenance"])
               for i, r in saved.get("cases", {}).items() if i in known]
    return results, {i: m for i, m in saved.get("failed", {}).items() if i in known}


def rerender(out: str, *, mfu: float = DEFAULT_MFU, command: str = "") -> int:
    """Rewrites the page from the JSON beside it, compiling nothing."""
    path = epath.Path(out)
    results, failed = load(path, mfu)
    _write(path, render(results, failed, mfu, command))
    return 0


def select(patterns: tuple[str, ...]) -> list[Case]:
    """The cases whose id matches one of the shell patterns (all when none); a pattern matching none is an error."""
    all_cases = cases()
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(c.id, pattern) for c in all_cases):
            raise errors.UserError(f"--rows: {pattern!r} matches no case of the page; the cases are "
                                   f"{', '.join(c.id for c in all_cases)}")
    return [c for c in all_cases if not patterns or any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


def main(out: str, *, mfu: float = DEFAULT_MFU, searching: bool = True, patterns: tuple[str, ...] = (),
         resume: bool = False, command: str = "python -m xmag_jax.aot --docs docs/aot.md",
         log: Callable[[str], None] = print) -> int:
    """Compiles the selected cases at their page batch (in page order), then searches the table rows' largest
    batch (unless `searching` is off), merging each result into the page's JSON and rewriting the page.
    `resume`: cases the JSON holds are not compiled again (a held row that was not searched is searched)."""
    path = epath.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = {r.case.id: r for r in load(path, mfu)[0]} if resume else {}
    provenance = {"date": datetime.date.today().isoformat(), "command": command,
                  "versions": f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}"}
    mine: dict[str, Result] = {}
    failed: dict[str, str] = {}

    def flush() -> None:
        with open(os.fspath(path.parent / f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other processes filling the same page merge in turn
            saved, saved_failed = load(path, mfu)
            merged = {r.case.id: r for r in saved} | mine
            failures = {i: m for i, m in saved_failed.items() if i not in mine} | failed
            order = [c.id for c in cases()]
            _write(json_path(path), json.dumps(
                {"cases": {i: merged[i].to_json() for i in order if i in merged},
                 "failed": {i: failures[i] for i in order if i in failures and i not in merged}}, indent=1))
            _write(path, render([merged[i] for i in order if i in merged], failures, mfu, command))

    todo = [c for c in select(patterns) if c.id not in held]
    for case in todo:
        log(f"{case.id}: {case.config_name} on {case.topology}")
        try:
            config, topo = load_config(case.config, case.overrides), topologies.parse(case.topology)
            report = compile_lib.compile_step(config, topo, global_batch=page_batch(config, topo), mfu=mfu,
                                              config_name=case.config_name)
        except Exception as error:  # noqa: BLE001 - one broken case must not cost the others
            log(f"  FAILED: {type(error).__name__}: {error}")
            failed[case.id] = f"{type(error).__name__}: {errors.one_line(str(error))[:200]}"
            flush()
            continue
        log(compile_lib.format_report(report))
        mine[case.id] = Result(case, report.global_batch, [report], False, provenance)
        flush()
    if searching:
        for case in select(patterns):
            result = mine.get(case.id) or held.get(case.id)
            if not case.searched or result is None or result.searched:
                continue
            log(f"{case.id}: largest batch")
            config, topo = load_config(case.config, case.overrides), topologies.parse(case.topology)
            _, tries = search.find_batch(config, topo, mfu=mfu, config_name=case.config_name, max_tries=MAX_TRIES,
                                         initial=result.at_batch, log=log)
            mine[case.id] = Result(case, result.batch, tries, True, provenance)
            flush()
    if not todo and not mine:
        flush()  # nothing to compile: the page is still rewritten from the JSON
    log(f"wrote {path}")
    return 0
