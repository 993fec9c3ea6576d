"""`python -m xmag_jax.teacher_cache --config CONFIG --out CACHE [--dtype float32|bfloat16] [--batch N]
[--config.KEY=VALUE ...]`: write (or resume) the teacher-target cache of a distillation config.

Multi-host: pass `--coordinator_address host:port --num_processes N --process_id I` on every host, or
`--distributed` on Cloud TPU, as for `xmag_jax.train`; each process writes the cache shards of its slice
of the source shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from xmag_jax import cli, errors

PROG = "python -m xmag_jax.teacher_cache"


def _define(fv: flags.FlagValues) -> None:
    from xmag_jax.data import distributed

    flags.DEFINE_string("out", None, "Cache directory to write (or resume).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype of the targets.", flag_values=fv)
    flags.DEFINE_integer("batch", None, "Fields (pair x state) per global teacher forward (default: "
                         "config.batch_size).", flag_values=fv)
    flags.DEFINE_integer("read_threads", 4, "Threads decoding the 20x JPEGs.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Progress bar (pairs/s, bad records).", flag_values=fv)
    distributed.define_distributed(fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("config", "out"),
                      config=(None, "Config file (configs/NAME.py[:ARG])."))


def main(argv: Sequence[str] | None = None) -> int:
    from xmag_jax.data import distributed
    from xmag_jax.teacher_cache import writer

    fv, _ = COMMAND.parse(argv)
    distributed.initialize_distributed(fv)
    summary = writer.write(fv.config, fv.out, dtype=fv.dtype, batch=fv.batch, read_threads=fv.read_threads,
                           progress=fv.progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
