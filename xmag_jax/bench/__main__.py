"""`python -m xmag_jax.bench NAME [flags]`: run one benchmark; each lives in its own module with `main(argv)`."""

from xmag_jax import cli, errors

PROG = "python -m xmag_jax.bench"
BENCHMARKS = {
    "forward": "xmag_jax.bench.forward",
    "parity": "xmag_jax.bench.parity",
    "prep": "data_prep.bench",
    "input": "xmag_jax.bench.input",
    "train": "xmag_jax.bench.train",
    "embed": "xmag_jax.bench.embed",
    "finetune": "xmag_jax.bench.finetune",
}


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(PROG, cli.lazy_mains(BENCHMARKS), argv, doc=__doc__)


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
