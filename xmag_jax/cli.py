"""The one command-line convention of every tool: absl flags, each command on its own `FlagValues`.

    def _define(fv: flags.FlagValues) -> None:
        flags.DEFINE_float("mpp", 2.0, "µm/px of the tiles (2.0 = 5x)", flag_values=fv)

    COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("slides", "out"))

    def main(argv: Sequence[str] | None = None) -> int:
        fv, _ = COMMAND.parse(argv)        # argv without the program name; None = sys.argv[1:]
        ...

    if __name__ == "__main__":
        errors.run_cli(main, prog=PROG)

Flag names are snake_case; booleans are `--flag` / `--noflag` (or `--flag=false`). A command with a config file
(`config=(default, help)`) takes ml_collections' `--config FILE[:ARG]` and `--config.KEY=VALUE` overrides.
`--help` prints every flag with its default (units are in the help strings) and exits 0. A bad flag (unknown,
with a did-you-mean; a bad value; a missing required flag) raises `errors.UserError`: one line and exit 2
under `errors.run_cli`. `pass_through=True` leaves unknown flags to the caller (data_prep hands them to Beam).
Nothing is defined on absl's global `FLAGS`, so any set of commands can be imported in one process.
"""

from __future__ import annotations

import dataclasses
import difflib
import faulthandler
import functools
import importlib
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence

from absl import flags

from xmag_jax import errors

HELP_FLAGS = ("-h", "--help", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line: `define(fv)` declares its flags on a fresh `FlagValues` at every parse.

    `required`: flags that must be given. `one_of`: groups of flags of which exactly one must be given.
    `config`: (default file or None, help) of an ml_collections `--config` flag; `lock_config` as
    `config_flags.DEFINE_config_file`; `known_keys()` (the schema's dotted keys) gives the did-you-mean of a
    `--config.KEY` the config lacks. `pass_through`: unknown flags and words are returned to the caller instead
    of refused (data_prep's Beam options); `positional` names them in the usage line."""

    prog: str
    define: Callable[[flags.FlagValues], None]
    doc: str = ""
    required: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    config: tuple[str | None, str] | None = None
    lock_config: bool = True
    known_keys: Callable[[], Iterable[str]] | None = None
    pass_through: bool = False
    positional: str = ""

    def flag_values(self, argv: Sequence[str] = ()) -> flags.FlagValues:
        """The command's flags, unparsed (`argv` is where ml_collections looks for `--config.KEY` overrides)."""
        fv = flags.FlagValues()
        if self.config is not None:
            from ml_collections import config_flags

            default, help_ = self.config
            config_flags.DEFINE_config_file("config", default, help_, flag_values=fv, lock_config=self.lock_config,
                                            sys_argv=[self.prog, *argv])
        self.define(fv)
        return fv

    def help(self) -> str:
        """Usage, the docstring and every flag with its default (or `required`)."""
        fv = self.flag_values()
        need = " ".join(f"--{n}=..." for n in self.required)
        usage = " ".join(s for s in (self.prog, need, "[flags]", self.positional) if s)
        lines = [f"usage: {usage}", ""]
        if self.doc.strip():
            lines += [textwrap.dedent(self.doc).strip(), ""]
        lines.append("flags:")
        for flag in _flags_of(fv):
            lines.append(f"  {_flag_usage(flag)}")
            lines += textwrap.wrap(f"{flag.help} ({self._default_text(flag)})", width=100,
                                   initial_indent=" " * 6, subsequent_indent=" " * 6)
            if flag.name == "config" and self.config is not None:
                lines.append("      --config.KEY=VALUE overrides one key of the config (after --config)")
        lines.append("  --help\n      this text")
        return "\n".join(lines)

    def _default_text(self, flag: flags.Flag) -> str:
        if flag.name in self.required:
            return "required"
        group = next((g for g in self.one_of if flag.name in g), None)
        if group is not None:
            return "one of " + ", ".join(f"--{n}" for n in group) + " is required"
        if flag.name == "config" and self.config is not None:  # the file, not the ConfigDict it loads to
            return f"default: {show(self.config[0])}"
        return f"default: {show(flag.default)}"

    def parse(self, argv: Sequence[str] | None = None) -> tuple[flags.FlagValues, list[str]]:
        """Parses `argv` (without the program name; None: `sys.argv[1:]`). Returns the flags and, with
        `pass_through`, the arguments left unparsed (unknown flags and positional words, in order).
        `--help` prints `help()` and raises `SystemExit(0)`; a bad flag raises `errors.UserError`."""
        argv = list(sys.argv[1:] if argv is None else argv)
        words = argv[:argv.index("--")] if "--" in argv else argv
        if any(a in HELP_FLAGS for a in words):
            print(self.help())
            raise SystemExit(0)
        fv = self.flag_values(argv)
        try:
            rest = errors.parse_flags(fv, [self.prog, *argv], self.known_keys, known_only=self.pass_through)[1:]
        except errors.UserError as error:
            raise errors.UserError(_with_hint(str(error), fv)) from None
        if rest and not self.pass_through:
            raise errors.UserError(f"unexpected arguments {rest}")
        for word in rest:  # a flag of this command misspelt, e.g. with '-', is not for Beam either
            name = word[2:].split("=")[0].replace("-", "_") if word.startswith("--") else ""
            if name in fv or (name.startswith("no") and name[2:] in fv):
                raise errors.UserError(f"unknown flag {word.split('=')[0]} (did you mean --{name}?)")
        missing = [f"--{n}" for n in self.required if fv[n].value is None]
        if missing:
            raise errors.UserError(f"missing required flag{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        for group in self.one_of:
            given = [f"--{n}" for n in group if fv[n].present]
            if len(given) != 1:
                raise errors.UserError(f"give exactly one of {', '.join(f'--{n}' for n in group)}"
                                       + (f" (got {', '.join(given)})" if given else ""))
        return fv, rest


def dispatch(prog: str, commands: dict[str, Callable[[list[str]], int | None]], argv: Sequence[str] | None,
             doc: str = "") -> int:
    """`prog SUBCOMMAND [flags]`: runs `commands[SUBCOMMAND](flags)`; `prog --help` lists the subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise errors.UserError(f"name a subcommand: {', '.join(commands)}")
    if argv[0] in HELP_FLAGS:
        print(f"usage: {prog} {{{','.join(commands)}}} [flags]\n\n{textwrap.dedent(doc).strip()}\n\n"
              f"`{prog} SUBCOMMAND --help` lists the flags of one.")
        return 0
    if argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], list(commands), n=1)
        raise errors.UserError(f"unknown subcommand {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; one of {', '.join(commands)}")
    return commands[argv[0]](argv[1:]) or 0


def lazy_mains(modules: dict[str, str]) -> dict[str, Callable[[list[str]], int | None]]:
    """{subcommand: module name} -> {subcommand: that module's `main`}, imported when the subcommand runs."""
    return {name: functools.partial(_import_main, module) for name, module in modules.items()}


def _import_main(module: str, argv: list[str]) -> int | None:
    return importlib.import_module(module).main(argv)


def start_absl_logging() -> None:
    """What `absl.app.run` does before `main` for a command that logs through absl: its handler at INFO and
    faulthandler (absl's global logging flags keep their defaults)."""
    from absl import logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    faulthandler.enable()


def show(value) -> str:
    """A default as it is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(show, value)) if value else "none"
    return str(value) if value != "" else "''"


def _flags_of(fv: flags.FlagValues) -> list[flags.Flag]:
    seen: dict[int, flags.Flag] = {}
    for name in fv:
        seen.setdefault(id(fv[name]), fv[name])
    return list(seen.values())


def _flag_usage(flag: flags.Flag) -> str:
    if isinstance(flag, flags.BooleanFlag):
        return f"--[no]{flag.name}"
    if flag.name == "config":
        return "--config=FILE[:ARG]"
    return f"--{flag.name}=" + ("VALUE[,VALUE]" if isinstance(flag, flags.MultiFlag) else "VALUE")


def _with_hint(message: str, fv: flags.FlagValues) -> str:
    """absl's unknown-flag message plus a did-you-mean over this command's flags."""
    prefix = "Unknown command line flag '"
    if not message.startswith(prefix):
        return message
    name = message[len(prefix):].split("'")[0]
    names = [n for n in fv if len(n) > 1]
    close = difflib.get_close_matches(name.replace("-", "_"), names, n=1, cutoff=0.6)
    if not close and name.startswith("no"):
        close = difflib.get_close_matches(name[2:].replace("-", "_"), names, n=1, cutoff=0.6)
        close = [f"no{c}" for c in close]
    return f"unknown flag --{name}" + (f" (did you mean --{close[0]}?)" if close else "")
