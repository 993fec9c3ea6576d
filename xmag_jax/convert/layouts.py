"""Which release format a weights file's tensors are in, and their timm key names: the one place that tells
the layouts apart (`dinov2` for DINOv2 / XMAG release / timm names, `hf_dinov2` for transformers)."""

from __future__ import annotations

import numpy as np

from xmag_jax.convert import dinov2, hf_dinov2
from xmag_jax.convert.mapping import WeightsError
from xmag_jax.models.registry import Arch

LAYOUTS = (
    "timm VisionTransformer (patch_embed.proj.weight, blocks.N.*)",
    "DINOv2 torch.hub (the same names plus mask_token)",
    "XMAG release ({'state_dict': {'model.<DINOv2 key>': tensor}}, or keys under student_ema.model.)",
    "transformers Dinov2Model (embeddings.patch_embeddings.projection.weight, encoder.layer.N.*)",
)


class UnknownLayout(WeightsError):
    """A state dict in none of the understood layouts."""


def to_timm_layout(state_dict: dict[str, np.ndarray], arch: Arch, source: str) -> tuple[dict[str, np.ndarray],
                                                                                         list[str]]:
    """timm-named tensors for `arch` and notes on what was dropped or resampled; raises `UnknownLayout`."""
    if hf_dinov2.is_hf_dinov2(state_dict):
        return hf_dinov2.to_timm(state_dict, source=source), []
    if dinov2.prefix(state_dict) is not None:
        return dinov2.to_timm(state_dict, arch, source=source)
    some = sorted(state_dict)[:5]
    raise UnknownLayout(f"{source}: no ViT found (keys {some}{', ...' if len(state_dict) > 5 else ''}); "
                        f"understood layouts: {'; '.join(LAYOUTS)}")
