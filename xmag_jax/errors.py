"""Errors a person can fix, and how every command line reports them: one line on stderr, exit status 2.

    class ManifestError(errors.UserError): ...        # bad input: the message names the file/field and
                                                      # what was expected
    if __name__ == "__main__":
        errors.run_cli(main, prog="python -m data_prep.tile_pairs")

A `UserError` never shows a traceback; anything else is a bug and keeps its traceback. Every command parses
its flags with `xmag_jax.cli` (absl + ml_collections) over `parse_flags`, so a bad flag or `--config.KEY=VALUE`
is one line too.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

from xmag_jax import platforms

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (a file, a flag, a config value): the message names it and says what was expected."""


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot run; raised before anything is compiled."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def report(error: BaseException, prog: str) -> None:
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[Sequence[str] | None], int | None], *, prog: str,
            argv: Sequence[str] | None = None) -> NoReturn:
    """Runs `main(argv)` and exits with its return code; a `UserError` becomes one line and exit 2.

    JAX's platforms are chosen for the host first (`platforms.configure`), before `main` can start a backend."""
    platforms.configure()
    try:
        rc = main(argv)
    except UserError as e:
        report(e, prog)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(rc or 0)


def parse_flags(fv, argv: list[str], known_keys: Callable[[], Iterable[str]] | None = None, *,
                known_only: bool = False) -> list[str]:
    """`fv(argv)` (an absl `FlagValues`, with an ml_collections `--config` flag if the command has one), where a
    bad flag, a config file that does not load or an override of a key the config lacks raises `UserError`.
    The config file is loaded here (ml_collections loads it lazily, at its first use). `known_keys()` (the
    schema's dotted keys) gives the did-you-mean for an unknown `--config.KEY`. Returns the unparsed arguments
(`argv[0]` first; with `known_only`, unknown flags too)."""
    from absl import flags

    try:
        rest = fv(argv, known_only=known_only)
        config = fv["config"].value if "config" in fv else None
        if config is not None:
            config.to_dict()
        return rest
    except flags.Error as error:
        message = str(error)
    except (AttributeError, KeyError, ValueError, OSError) as error:  # ml_collections: the file or an override
        keys = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
        known = set(known_keys()) if known_keys else set()
        unknown = [k for k in keys if known and k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message = f"--config.{unknown[0]}: not a key of the config{hint}"
        else:  # KeyError's str() is the repr of its message
            message = f"--config: {error.args[0] if isinstance(error, KeyError) and error.args else error}"
    raise UserError(message)
