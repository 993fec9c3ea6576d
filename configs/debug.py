"""Debug distillation: tiny teacher and student on the synthetic shards; about a minute on a laptop CPU.

    python -m xmag_jax.train --config configs/debug.py --workdir /tmp/xmag_debug \
        --config.data.dir=demo_out/pairs --config.total_steps=20

This is what `make demo` trains. `arg` is unused; overrides go through `--config.KEY=VALUE`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 40
    c.batch_size = 8  # global, in tile pairs; must divide by the mesh's data-parallel size

    # Frozen 20x teacher: a registry name plus an Orbax checkpoint from `xmag_jax.convert import`.
    # An empty checkpoint means random init, accepted only with allow_random_teacher (debug/tests).
    c.teacher = ml_collections.ConfigDict()
    c.teacher.name = "vit_test_teacher"
    c.teacher.checkpoint = ""
    c.teacher.allow_random_teacher = True
    c.teacher.dtype = "bfloat16"
    c.teacher.sharding = "replicate"  # or "fsdp" when the teacher does not fit replicated

    # 5x student, trained from scratch.
    c.student = ml_collections.ConfigDict()
    c.student.name = "vit_test"
    c.student.dtype = "float32"  # compute dtype; parameters stay float32
    c.student.remat = False

    c.data = ml_collections.ConfigDict()
    c.data.dir = "demo_out/pairs"
    c.data.split = "train"
    c.data.worker_count = 0  # Grain multiprocess workers; 0 = in-process
    c.data.prefetch_buffer = 2
    c.data.max_bad_record_fraction = 0.01
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.d4 = True
    c.data.augment.color = True
    c.data.augment.hed = True
    c.data.augment.student_only = False

    # XMAG dual-level loss: global representation + local spatial token mapping (tile and token level).
    c.loss = ml_collections.ConfigDict()
    c.loss.global_weight = 1.0
    c.loss.global_smooth_l1_weight = 0.0
    c.loss.tile_weight = 1.0
    c.loss.token_weight = 1.0
    c.loss.projector_hidden = 256
    c.loss.mode = "dual"  # "dual" | "global_only" | "local_only"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr_ratio = 0.01
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1
    c.optim.ema_decay = 0.0  # 0 disables the EMA student

    # Mesh axes; -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.log_every = 5
    c.peak_tflops_per_device = 1.0  # for MFU; set to the chip's bf16 peak on real hardware

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c
