"""`python -m xmag_jax.eval {probe,mil,fidelity} [flags]`: one evaluation per module, each with `main(argv)`.

Bad input (a missing folder, a malformed labels CSV, mixed feature files) is one line on stderr and exit 2.
"""

import sys

from xmag_jax import cli, errors

PROG = "python -m xmag_jax.eval"
COMMANDS = {
    "probe": "xmag_jax.eval.probe",
    "mil": "xmag_jax.eval.mil",
    "fidelity": "xmag_jax.eval.fidelity",
}


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(PROG, cli.lazy_mains(COMMANDS), argv, doc=__doc__)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else ""
    errors.run_cli(main, prog=f"{PROG} {command}".strip(), argv=sys.argv[1:])
