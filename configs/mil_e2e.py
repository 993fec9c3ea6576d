"""End-to-end MIL at 5x, real size: the XMAG ViT-B/14 student (`vit_b14`) + GatedABMIL on slide labels.

    python -m xmag_jax.finetune --config configs/mil_e2e.py --workdir gs://B/e2e \
        --config.data.bags=gs://B/bags --config.data.labels=labels.csv --config.model.init=gs://B/student

`model.init` is a distilled student checkpoint (`save_model`; its architecture comes from it). Every key is
in `xmag_jax/finetune/config.py`; this file only changes values. 8 slides x 1024 tiles per step with
per-block remat in bf16 fit one v5p-8 / v6e-8 slice (`python -m xmag_jax.finetune.aot`).
"""

import ml_collections

from xmag_jax.finetune import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.base_config()
    c.data.folds = 5
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.freeze_blocks = 4
    c.train.epochs = 20
    c.train.slides_per_step = 8
    c.train.tiles_per_slide = 1024
    c.optim.head_lr = 2e-4
    c.optim.backbone_lr = 1e-5
    c.optim.layer_decay = 0.75
    c.eval.chunk_tiles = 512
    c.frozen.epochs = 20
    c.checkpoint.every = 100
    return c
