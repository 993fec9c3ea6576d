"""timm <-> Flax weight conversion (`python -m xmag_jax.convert import|export`)."""

from xmag_jax.convert.mapping import StateDictMismatch, from_timm, key_table, to_timm
from xmag_jax.convert.timm_io import export_timm, flax_from_state_dict, import_timm, read_state_dict, timm_config

__all__ = ["StateDictMismatch", "export_timm", "flax_from_state_dict", "from_timm", "import_timm", "key_table",
           "read_state_dict", "timm_config", "to_timm"]
