r"""Command line of the AOT compile report.

    python -m xmag_jax.aot --config configs/uni2h_vits14.py --topology v5p-256 [--global_batch 2048] \
        [--slices 2] [--mfu 0.5] [--find_batch] [--require_fit] [--json report.json] [--config.KEY=VALUE]
    python -m xmag_jax.aot --docs docs/aot.md [--nosearch] [--rows 'uni2h_vits14/*'] [--resume] [--rerender]

Compiles the train step for the topology (`compile.compile_step`) and prints its report; `--find_batch`
searches the largest global batch that fits (`search.find_batch`); `--docs` writes the whole report page
(`docs.main`). Exit status 3 with `--require_fit` when the step does not fit; 2 for bad input (unknown
topology, config error, bad flag).
"""

from __future__ import annotations

import copy
import json
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from xmag_jax import atomic, cli, errors, topologies
from xmag_jax.aot import compile as compile_lib
from xmag_jax.aot import docs, search
from xmag_jax.aot.compile import DEFAULT_MFU, Report
from xmag_jax.topologies import GiB

NOT_FIT_EXIT = 3
PROG = "python -m xmag_jax.aot"


def _define_flags(fv: flags.FlagValues) -> None:
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
    flags.DEFINE_string("docs", None, "Write the whole markdown report page (e.g. docs/aot.md; its data goes to "
                        "docs/aot.json) by compiling every case, and exit.", flag_values=fv)
    flags.DEFINE_bool("search", True, "With --docs: search each row's largest batch; --nosearch compiles each row "
                      "once at its batch and shows the estimated largest batch (about 17 compiles instead of ~45).",
                      flag_values=fv)
    flags.DEFINE_list("rows", None, "With --docs: compile only the cases whose id matches one of these shell "
                      "patterns (uni2h_vits14/v5p-256, xmag_uni2h_vitb14/*, knobs/*); the page keeps the rest.",
                      flag_values=fv)
    flags.DEFINE_bool("resume", False, "With --docs: keep the cases docs/aot.json holds, compile the missing.",
                      flag_values=fv)
    flags.DEFINE_bool("rerender", False, "With --docs: rewrite the page from its JSON, no compiling.",
                      flag_values=fv)


COMMAND = cli.Command(PROG, _define_flags, doc=__doc__, config=(None, "Config file (configs/NAME.py[:ARG])."),
                      lock_config=False)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    fv, _ = COMMAND.parse(given)
    if fv.docs:
        command = shlex.join([*PROG.split(), *given])
        if fv.rerender:
            return docs.rerender(fv.docs, mfu=fv.mfu, command=command)
        return docs.main(fv.docs, mfu=fv.mfu, searching=fv.search, patterns=tuple(fv.rows or ()),
                         resume=fv.resume, command=command, log=lambda s: print(s, flush=True))
    if fv.config is None or fv.topology is None:
        errors.report(errors.UserError("--config and --topology are required (or --docs PATH)"), PROG)
        return errors.EXIT_USER_ERROR
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
            report, tries = search.find_batch(config, topo, mfu=fv.mfu, config_name=name, max_batch=fv.max_batch,
                                              log=lambda s: print(s, flush=True))
            if report is None:
                report = tries[0]
                print("no batch fits; the smallest try:")
        else:
            report = compile_lib.compile_step(config, topo, global_batch=fv.global_batch, mfu=fv.mfu,
                                              config_name=name)
        if fv.teacher_cache:
            print(compile_lib.format_report(report), flush=True)
            cached = copy.deepcopy(config)
            with cached.unlocked():
                cached.data.teacher_cache = "CACHE"  # compile-only: no cache is read
            report = compile_lib.compile_step(cached, topo, global_batch=report.global_batch, mfu=fv.mfu,
                                              config_name=f"{name} --config.data.teacher_cache=CACHE")
    except ValueError as error:  # ConfigError included: the message names the config key
        errors.report(error, PROG)
        return errors.EXIT_USER_ERROR
    print(compile_lib.format_report(report))
    if fv.json:
        payload = {"report": report.to_json(), "tries": [t.to_json() for t in tries]}
        atomic.write_text(fv.json, json.dumps(payload, indent=1))
    if fv.require_fit and not report.fits:
        print(f"error: does not fit: {report.total_bytes / GiB:.2f} GiB per chip needed, "
              f"{report.hbm_bytes / GiB:.2f} GiB available", file=sys.stderr)
        return NOT_FIT_EXIT
    return 0
