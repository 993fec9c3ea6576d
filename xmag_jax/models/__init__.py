"""The ViT family: one Flax NNX VisionTransformer, the architecture registry and model checkpoints."""

from xmag_jax.models.registry import ARCHS, Arch, create_model, embed, get_arch, normalize
from xmag_jax.models.vit import VisionTransformer, ViTConfig, ViTOutput

__all__ = ["ARCHS", "Arch", "ViTConfig", "ViTOutput", "VisionTransformer", "create_model", "embed", "get_arch",
           "normalize"]
