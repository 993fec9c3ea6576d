r"""Command line of the AOT compile report.

    python -m xmag_jax.aot --config configs/uni2h_vits14.py --topology v5p-256 [--global-batch 2048] \
        [--slices 2] [--mfu 0.5] [--find-batch] [--require-fit] [--json report.json] [--config.KEY=VALUE]
    python -m xmag_jax.aot --docs docs/aot.md [--no-search] [--rows 'uni2h_vits14/*'] [--resume] [--rerender]

Compiles the train step for the topology (`compile.compile_step`) and prints its report; `--find-batch`
searches the largest global batch that fits (`search.find_batch`); `--docs` writes the whole report page
(`docs.main`). Flags may be spelled with dashes or underscores. Exit status 3 with `--require-fit` when
the step does not fit; 2 for bad input (unknown topology, config error, bad flag).
"""

from __future__ import annotations

import copy
import json
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from xmag_jax import errors, topologies
from xmag_jax.aot import compile as compile_lib
from xmag_jax.aot import docs, search
from xmag_jax.aot.compile import DEFAULT_MFU, Report
from xmag_jax.topologies import GiB

NOT_FIT_EXIT = 3
PROG = "python -m xmag_jax.aot"


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """The command's flags; `--config.KEY=VALUE` flags are defined from `argv` (not `sys.argv`: `main(argv)`)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).", flag_values=fv,
                                    lock_config=False, sys_argv=argv)
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
    flags.DEFINE_bool("no_search", False, "With --docs: compile each row once at its batch and show the estimated "
                      "largest batch instead of searching it (about 17 compiles instead of ~45).", flag_values=fv)
    flags.DEFINE_list("rows", None, "With --docs: compile only the cases whose id matches one of these shell "
                      "patterns (uni2h_vits14/v5p-256, xmag_uni2h_vitb14/*, knobs/*); the page keeps the rest.",
                      flag_values=fv)
    flags.DEFINE_bool("resume", False, "With --docs: keep the cases docs/aot.json holds, compile the missing.",
                      flag_values=fv)
    flags.DEFINE_bool("rerender", False, "With --docs: rewrite the page from its JSON, no compiling.",
                      flag_values=fv)


def _underscored(arg: str) -> str:
    """`--find-batch=1` -> `--find_batch=1`; `--config.KEY=VALUE` and values stay as they are."""
    if not arg.startswith("--") or arg.startswith("--config."):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv if argv is None else argv)
    argv = [given[0], *map(_underscored, given[1:])]
    fv = flags.FlagValues()
    _define_flags(fv, argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: {PROG} --config=configs/NAME.py --topology=v5p-256 [flags]\n"
              f"       {PROG} --docs=docs/aot.md [--no-search] [--rows=PATTERNS] [--resume]\n\n{fv.get_help()}")
        return 0
    rest = errors.parse_flags(fv, argv)
    if len(rest) > 1:
        raise errors.UserError(f"unexpected arguments {rest[1:]}")
    if fv.docs:
        command = shlex.join([*PROG.split(), *given[1:]])
        if fv.rerender:
            return docs.rerender(fv.docs, mfu=fv.mfu, command=command)
        return docs.main(fv.docs, mfu=fv.mfu, searching=not fv.no_search, patterns=tuple(fv.rows or ()),
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
