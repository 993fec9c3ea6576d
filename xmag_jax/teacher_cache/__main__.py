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
from ml_collections import config_flags

from xmag_jax import errors

PROG = "python -m xmag_jax.teacher_cache"


def _flags(argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    argv = [PROG, *argv]
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).", flag_values=fv,
                                    sys_argv=argv)
    flags.DEFINE_string("out", None, "Cache directory to write (or resume).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype of the targets.", flag_values=fv)
    flags.DEFINE_integer("batch", None, "Fields (pair x state) per global teacher forward (default: "
                         "config.batch_size).", flag_values=fv)
    flags.DEFINE_integer("read_threads", 4, "Threads decoding the 20x JPEGs.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Progress bar (pairs/s, bad records).", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with cluster auto-detection.",
                      flag_values=fv)
    errors.parse_flags(fv, argv)
    for name in ("config", "out"):
        if fv[name].value is None:
            raise errors.UserError(f"--{name} is required")
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from xmag_jax import train
    from xmag_jax.teacher_cache import writer

    fv = _flags(sys.argv[1:] if argv is None else argv)
    train.initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed)
    summary = writer.write(fv.config, fv.out, dtype=fv.dtype, batch=fv.batch, read_threads=fv.read_threads,
                           progress=fv.progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
