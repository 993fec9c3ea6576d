"""Small CellEcoNet-style survival run: ~100 synthetic slides on a laptop CPU in a few minutes.

    python -m data_prep.synthetic_survival features --out /tmp/surv --n 100
    python -m xmag_jax.survival --config configs/celleconet_debug.py --workdir /tmp/surv_run \
        --config.data.features=/tmp/surv/features --config.data.clinical=/tmp/surv/clinical.csv

Keys and units: `xmag_jax/survival/config.py` (the schema); this file only changes values.
"""

import ml_collections

from xmag_jax.survival import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.base_config()
    c.folds = 3
    c.model.dim = 32
    c.model.phrase_layers = 1
    c.model.phrase_heads = 2
    c.model.sentence_layers = 1
    c.model.sentence_heads = 2
    c.model.dropout = 0.2
    c.model.global_attention_max_tiles = 256
    c.abmil.hidden = 32
    c.abmil.attn_dim = 16
    c.abmil.dropout = 0.2
    c.transformer_no_pos.dim = 32
    c.transformer_no_pos.layers = 1
    c.transformer_no_pos.heads = 2
    c.transformer_no_pos.dropout = 0.2
    c.train.epochs = 20
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.max_tiles = 256
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-2  # ~60 training slides: all three neural models memorise them without it
    c.eval.subgroups = ("stage",)
    return c
