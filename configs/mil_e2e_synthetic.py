"""End to end vs frozen on the synthetic texture slides (`data_prep.synthetic`): a random-init `vit_test`.

Used by `python -m xmag_jax.bench finetune --compare` and tests/test_finetune_e2e.py. The bags are tiled at
1.0 µm/px in 56 px tiles (not 5x's 2.0 µm/px in 224 px): at 2.0 µm/px a nucleus is 2-5 px and the texture
needs far more steps than a CPU affords. The head's input is standardised (head.standardize), which scales a
backbone change by ~1/0.08 here: backbone_lr 1e-5 (the same for every block, layer_decay 1.0) learns; 1e-3
(or 1e-4 unstandardised) collapses the random student's features. Values only; every key is in
`xmag_jax/finetune/config.py`.
"""

import ml_collections

from xmag_jax.config import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "mil_e2e_debug").get_config(arg)
    c.train.epochs = 30
    c.train.tiles_per_slide = 32
    c.frozen.epochs = 30
    c.optim.backbone_lr = 1e-5
    c.optim.layer_decay = 1.0
    c.heatmap_slides = 1
    return c
