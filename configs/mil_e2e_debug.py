"""Debug end-to-end MIL: tiny student, a few steps per fold; a few minutes on a laptop CPU.

    python -m xmag_jax.finetune --config configs/mil_e2e_debug.py --workdir /tmp/e2e \
        --config.data.bags=BAGS --config.data.labels=labels.csv --config.model.init=STUDENT_CKPT

Every key, with its meaning and units, is in `xmag_jax/finetune/config.py`; this file only changes values.
"""

import ml_collections

from xmag_jax.finetune import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.base_config()
    c.data.folds = 2
    c.model.dtype = "float32"
    c.head.hidden = 64
    c.head.attn_dim = 32
    c.train.epochs = 6
    c.train.slides_per_step = 4
    c.train.tiles_per_slide = 8
    c.optim.head_lr = 1e-3
    c.optim.backbone_lr = 3e-4
    c.optim.layer_decay = 0.9
    c.eval.chunk_tiles = 32
    c.frozen.epochs = 6
    c.frozen.lr = 1e-3
    c.checkpoint.every = 10
    c.log_every = 5
    c.heatmap_slides = 2
    return c
