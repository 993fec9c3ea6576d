"""`python -m xmag_jax.eval {probe,mil,fidelity} [args]`: one evaluation per module, each with `main(argv)`.

Bad input (a missing folder, a malformed labels CSV, mixed feature files) is one line on stderr and exit 2.
"""

import importlib
import sys

from xmag_jax import errors

COMMANDS = {
    "probe": "xmag_jax.eval.probe",
    "mil": "xmag_jax.eval.mil",
    "fidelity": "xmag_jax.eval.fidelity",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m xmag_jax.eval {{{','.join(COMMANDS)}}} [args]", file=sys.stderr)
        return errors.EXIT_USER_ERROR
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else ""
    errors.run_cli(main, prog=f"python -m xmag_jax.eval {command}".strip(), argv=sys.argv[1:])
