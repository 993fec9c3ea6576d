"""`python -m xmag_jax.bench NAME [args]`: run one benchmark; each lives in its own module with `main(argv)`."""

import importlib
import sys

from xmag_jax import errors

BENCHMARKS = {
    "forward": "xmag_jax.bench.forward",
    "parity": "xmag_jax.bench.parity",
    "prep": "data_prep.bench",
    "input": "xmag_jax.bench.input",
    "train": "xmag_jax.bench.train",
    "embed": "xmag_jax.bench.embed",
    "finetune": "xmag_jax.bench.finetune",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m xmag_jax.bench {{{','.join(BENCHMARKS)}}} [args]", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    errors.run_cli(main, prog="python -m xmag_jax.bench", argv=sys.argv[1:])
