"""`python -m xmag_jax.aot`: see `xmag_jax.aot.cli`."""

from xmag_jax import errors
from xmag_jax.aot import cli

if __name__ == "__main__":
    errors.run_cli(cli.main, prog=cli.PROG)
