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

from absl import app, flags, logging
from ml_collections import config_flags

from xmag_jax import errors, platforms
from xmag_jax.data import distributed
from xmag_jax.distill.metrics import NonFiniteLossError

PROG = "python -m xmag_jax.finetune"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/mil_e2e*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: folds' checkpoints, metrics, outputs, results.json.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with cluster auto-detection.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    platforms.configure()
    distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                       _DISTRIBUTED.value)
    from xmag_jax.finetune import run  # after flag parsing and the platform choice, before JAX starts a backend

    # Orbax logs every stage of every save at INFO: keep its warnings, and our progress lines.
    logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)

    try:
        summary = run.run(_CONFIG.value, _WORKDIR.value)
    except errors.UserError as error:
        errors.report(error, PROG)
        sys.exit(errors.EXIT_USER_ERROR)
    except NonFiniteLossError as error:
        logging.error("%s", error)
        print(f"{PROG}: error: {errors.one_line(error)}", file=sys.stderr)
        sys.exit(1)
    print(run.summary_line(summary))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=errors.absl_flags_parser(PROG))
