"""`python -m xmag_jax.eval {probe,mil,fidelity} [args]`: one evaluation per module, each with `main(argv)`."""

import importlib
import sys

COMMANDS = {
    "probe": "xmag_jax.eval.probe",
    "mil": "xmag_jax.eval.mil",
    "fidelity": "xmag_jax.eval.fidelity",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m xmag_jax.eval {{{','.join(COMMANDS)}}} [args]", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: the message names the file/field
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
