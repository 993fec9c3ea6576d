"""CellEcoNet-style survival run at real size (`python -m xmag_jax.survival --config configs/celleconet.py`).

    python -m xmag_jax.survival --config configs/celleconet.py --workdir runs/recurrence \
        --config.data.features=emb/student --config.data.clinical=clinical.csv

Every key, with its meaning and units, is in `xmag_jax/survival/config.py` (the schema); the real size is its
default. `celleconet_debug.py` changes values for a laptop CPU.
"""

import ml_collections

from xmag_jax.survival import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return schema.base_config()
