"""Debug distillation: tiny teacher and student on the synthetic shards; about a minute on a laptop CPU.

    python -m xmag_jax.train --config configs/debug.py --workdir /tmp/xmag_debug \
        --config.data.dir=demo_out/pairs --config.total_steps=20

This is what `make demo` trains. `arg` is unused; overrides go through `--config.KEY=VALUE`.
Every key, with its meaning and units, is in `configs/common.py` (the schema); this file only changes values.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = common.base_config()
    c.seed = 0
    c.total_steps = 40
    c.batch_size = 4  # one laptop CPU device; tests on 8 fake devices set 8

    c.teacher.name = "vit_test_teacher"
    c.teacher.checkpoint = ""
    c.teacher.allow_random_teacher = True
    c.teacher.dtype = "bfloat16"

    c.student.name = "vit_test"
    c.student.dtype = "float32"

    c.data.dir = "demo_out/pairs"
    c.data.worker_count = 0
    c.loss.projector_hidden = 256

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5

    c.log_every = 5
    c.log_record_index = True
    c.peak_tflops_per_device = 1.0  # a nominal CPU peak; MFU is only meaningful on accelerators

    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    return c
