"""Errors a person can fix, and how every command line reports them: one line on stderr, exit status 2.

    class ManifestError(errors.UserError): ...        # bad input: the message names the file/field and
                                                      # what was expected
    if __name__ == "__main__":
        errors.run_cli(main, prog="python -m data_prep.tile_pairs")

A `UserError` never shows a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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
