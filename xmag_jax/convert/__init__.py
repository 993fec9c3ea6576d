"""Released weights <-> Flax conversion (`python -m xmag_jax.convert import|export`)."""

from xmag_jax.convert.mapping import StateDictMismatch, WeightsError, from_timm, key_table, to_timm
from xmag_jax.convert.timm_io import (
    export_timm,
    flax_from_state_dict,
    import_timm,
    load_weights,
    read_state_dict,
    timm_config,
)

__all__ = ["StateDictMismatch", "WeightsError", "export_timm", "flax_from_state_dict", "from_timm", "import_timm",
           "key_table", "load_weights", "read_state_dict", "timm_config", "to_timm"]
