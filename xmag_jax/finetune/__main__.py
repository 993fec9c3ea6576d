r"""End-to-end MIL at 5x: `python -m xmag_jax.finetune --config configs/mil_e2e.py --workdir DIR`.

    python -m xmag_jax.finetune --config configs/mil_e2e_debug.py --workdir /tmp/e2e \
        --config.data.bags=BAGS --config.data.labels=labels.csv --config.model.init=STUDENT

`--config.KEY=VALUE` overrides any key of `xmag_jax/finetune/config.py`. Bad input (labels, bags, config,
memory) is one line on stderr and exit 2, before anything compiles; a NaN loss stops the run naming the
step (exit 1). Rerunning with the same workdir skips finished folds and resumes the interrupted one.

Multi-host: start the same command on every host with `--distributed` (cluster auto-detection, e.g. a TPU
slice) or `--coordinator_address HOST:PORT --num_processes N --process_id I`; each process reads its share of
the tiles; the workdir must be shared.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import flags, logging

from xmag_jax import cli, errors
from xmag_jax.data import distributed
from xmag_jax.distill.metrics import NonFiniteLossError

PROG = "python -m xmag_jax.finetune"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory: folds' checkpoints, metrics, outputs, results.json.",
                        flag_values=fv)
    distributed.define_distributed(fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("config", "workdir"),
                      config=(None, "Config file (configs/mil_e2e*.py)."))


def main(argv: list[str] | None = None) -> int:
    fv, _ = COMMAND.parse(argv)
    cli.start_absl_logging()
    distributed.initialize_distributed(fv)
    from xmag_jax.finetune import run  # after flag parsing and the platform choice, before JAX starts a backend

    # Orbax logs every stage of every save at INFO: keep its warnings, and our progress lines.
    logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)

    try:
        summary = run.run(fv.config, fv.workdir)
    except errors.UserError as error:
        errors.report(error, PROG)
        return errors.EXIT_USER_ERROR
    except NonFiniteLossError as error:
        logging.error("%s", error)
        print(f"{PROG}: error: {errors.one_line(error)}", file=sys.stderr)
        return 1
    print(run.summary_line(summary))
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
