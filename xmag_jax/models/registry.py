"""Architectures as data: teachers (20x pathology foundation models) and students (5x ViTs).

Each `Arch` holds the ViT configuration, the input normalisation, the embedding users take and the timm
model (name + kwargs) that has the same state-dict layout. `timm_kwargs` are JSON-able: SwiGLUPacked
entries use a timm DINOv2-giant model name whose definition already sets `mlp_layer=SwiGLUPacked,
act_layer=SiLU` and override every size, which builds the same module tree as the model cards'
`mlp_layer=SwiGLUPacked` keyword (a class, not writable to config.json). All entries set
`dynamic_img_size=True` (no effect at the native size; it allows other sizes instead of an error).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmag_jax.errors import ConfigError
from xmag_jax.models.vit import VisionTransformer, ViTConfig, ViTOutput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
EMBEDDINGS = ("pooled", "cls_mean_patch")

# timm model definitions that set mlp_layer=SwiGLUPacked, act_layer=nn.SiLU (timm/models/vision_transformer.py).
TIMM_SWIGLU_ARCHS = ("vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One registry entry. `embedding`: 'pooled' (ViTOutput.pooled) or 'cls_mean_patch' (Virchow2:
    concat(CLS, mean of patch tokens without registers)); `embed_dim` is that embedding's size.
    `dinov2_pos_embed`: released weights whose position table has another grid (DINOv2's 37x37 at 518 px) are
    resampled at import to `vit.img_size` the way the official DINOv2 code does at that size
    (`models.pos_embed.dinov2_resample_pos_embed`); otherwise the grids must match."""

    name: str
    vit: ViTConfig
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str
    timm_arch: str
    source: str
    dinov2_pos_embed: bool = False

    def __post_init__(self):
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"Arch {self.name}: embedding={self.embedding!r}; expected one of {EMBEDDINGS}")
        if (self.vit.mlp_layer == "swiglu_packed") != (self.timm_arch in TIMM_SWIGLU_ARCHS):
            raise ValueError(f"Arch {self.name}: timm_arch {self.timm_arch} does not build a {self.vit.mlp_layer} MLP")
        if self.vit.norm_eps != 1e-6:
            raise ValueError(f"Arch {self.name}: timm ViTs use LayerNorm eps 1e-6, got {self.vit.norm_eps}")
        if self.dinov2_pos_embed and (not self.vit.class_token or self.vit.no_embed_class or self.vit.reg_tokens):
            raise ValueError(f"Arch {self.name}: DINOv2 position tables have one class position and no registers")

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim * (2 if self.embedding == "cls_mean_patch" else 1)

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make `timm.create_model(self.timm_arch, **kwargs)` this architecture."""
        return timm_model_args(self.vit)


def timm_model_args(cfg: ViTConfig) -> dict[str, Any]:
    """JSON-able timm `VisionTransformer` kwargs for `cfg` (the MLP type comes from the timm model name)."""
    # timm.create_model drops None-valued kwargs, so "no LayerScale" is written as 0.0 (timm tests truthiness).
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
        reg_tokens=cfg.reg_tokens, no_embed_class=cfg.no_embed_class, init_values=cfg.init_values or 0.0,
        global_pool=cfg.global_pool, fc_norm=cfg.fc_norm, dynamic_img_size=cfg.dynamic_img_size, num_classes=0)


def _vit(**kw) -> ViTConfig:
    return ViTConfig(dynamic_img_size=True, **kw)


_SWIGLU_GIANT = dict(patch_size=14, embed_dim=1536, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed",
                     init_values=1e-5)

_ENTRIES = [
    # https://huggingface.co/MahmoodLab/UNI: timm.create_model("vit_large_patch16_224", img_size=224,
    # patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True); CLS token, ImageNet norm.
    Arch("uni", _vit(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_large_patch16_224",
         "huggingface.co/MahmoodLab/UNI model card (timm vit_large_patch16_224 kwargs)"),
    # https://huggingface.co/MahmoodLab/UNI2-h: vit_giant_patch14_224 with img_size=224, patch_size=14,
    # depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667*2, mlp_layer=SwiGLUPacked,
    # act_layer=SiLU, reg_tokens=8, no_embed_class=True, dynamic_img_size=True; CLS token.
    Arch("uni2_h", _vit(img_size=224, depth=24, reg_tokens=8, no_embed_class=True, **_SWIGLU_GIANT),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_giant_patch14_reg4_dinov2",
         "huggingface.co/MahmoodLab/UNI2-h model card (timm_kwargs); pos_embed [1, 256, 1536]"),
    # https://huggingface.co/paige-ai/Virchow2: config.json vit_huge_patch14_224 with img_size=224,
    # init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True and
    # create_model(mlp_layer=SwiGLUPacked, act_layer=SiLU); embedding concat(CLS, mean patch tokens) 2560-d.
    Arch("virchow2", _vit(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=5.3375,
                          mlp_layer="swiglu_packed", reg_tokens=4, init_values=1e-5, global_pool=""),
         IMAGENET_MEAN, IMAGENET_STD, "cls_mean_patch", "vit_giant_patch14_dinov2",
         "huggingface.co/paige-ai/Virchow2 model card + config.json; pos_embed [1, 261, 1280]"),
    # https://huggingface.co/bioptimus/H-optimus-0: config.json vit_giant_patch14_reg4_dinov2, img_size=224,
    # init_values=1e-5, mlp_ratio=5.33334, reg_tokens=4, no_embed_class; its own mean/std; CLS token.
    Arch("h_optimus_0", _vit(img_size=224, depth=40, reg_tokens=4, no_embed_class=True, **_SWIGLU_GIANT),
         HOPTIMUS_MEAN, HOPTIMUS_STD, "pooled", "vit_giant_patch14_reg4_dinov2",
         "huggingface.co/bioptimus/H-optimus-0 model card + config.json (1.1 B parameters)"),
    # https://huggingface.co/bioptimus/H-optimus-1: same architecture and normalisation as H-optimus-0.
    Arch("h_optimus_1", _vit(img_size=224, depth=40, reg_tokens=4, no_embed_class=True, **_SWIGLU_GIANT),
         HOPTIMUS_MEAN, HOPTIMUS_STD, "pooled", "vit_giant_patch14_reg4_dinov2",
         "huggingface.co/bioptimus/H-optimus-1 model card + config.json (same as H-optimus-0)"),
    # https://huggingface.co/prov-gigapath/prov-gigapath: config.json vit_giant_patch14_dinov2 with img_size=224,
    # patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334 (SwiGLUPacked
    # from the timm definition), no registers; CLS token, ImageNet norm.
    Arch("gigapath", _vit(img_size=224, depth=40, **dict(_SWIGLU_GIANT, patch_size=16)),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_giant_patch14_dinov2",
         "huggingface.co/prov-gigapath/prov-gigapath model card + config.json"),
    # https://huggingface.co/owkin/phikon-v2: transformers Dinov2Model ViT-L/16 (hidden 1024, 24 layers, 16
    # heads, mlp_ratio 4, GELU, LayerScale, layer_norm_eps 1e-6, 224 px, no registers); users take CLS of
    # last_hidden_state. The timm-equivalent layout below; `convert import` maps the transformers key names
    # (xmag_jax/convert/hf_dinov2.py). HF's own pos-embed interpolation differs from timm's at non-native sizes.
    Arch("phikon_v2", _vit(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_large_patch16_224",
         "huggingface.co/owkin/phikon-v2 model card + config.json (Dinov2, layer_norm_eps 1e-6); timm-equivalent"),
    # Students (XMAG, arXiv 2509.23097): DINOv2-style ViT-S/14 and ViT-B/14 at 224 px -> 16x16 token grid.
    # DINOv2's released weights (torch.hub dinov2_vit{s,b}14_pretrain.pth, timm vit_*_patch14_dinov2.lvd142m)
    # have a 518 px (37x37) position table, resampled at import as DINOv2 itself does at 224 px.
    Arch("vit_s14", _vit(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_small_patch14_dinov2",
         "timm vit_small_patch14_dinov2 at img_size=224", dinov2_pos_embed=True),
    Arch("vit_b14", _vit(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_base_patch14_dinov2",
         "timm vit_base_patch14_dinov2 layout at img_size=224", dinov2_pos_embed=True),
    # XMAG's released model (arXiv 2509.23097; github.com/AI4Path-Lab/XMAG encoding/encode.py): the EMA student,
    # a DINOv2 ViT-B/14 (LayerScale) run at 224 px with ImageNet mean/std; embedding = final-norm CLS, 768-d.
    # Its checkpoint holds {"state_dict": {"model.<DINOv2 key>": tensor}} with the 518 px (37x37) position table.
    Arch("xmag_vitb14", _vit(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_base_patch14_dinov2",
         "arXiv 2509.23097 + github.com/AI4Path-Lab/XMAG encoding/encode.py (DINOv2 ViT-B/14, 224 px, CLS)",
         dinov2_pos_embed=True),
    # Tiny CI models (16x16 grid): a student, and a UNI2-h-like teacher (SwiGLUPacked, registers, no_embed_class).
    Arch("vit_test", _vit(img_size=224, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_small_patch14_dinov2", "tiny CI student"),
    Arch("vit_test_teacher", _vit(img_size=224, patch_size=14, embed_dim=96, depth=2, num_heads=2,
                                  mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", reg_tokens=4,
                                  no_embed_class=True, init_values=1e-5),
         IMAGENET_MEAN, IMAGENET_STD, "pooled", "vit_giant_patch14_reg4_dinov2", "tiny CI UNI2-h-like teacher"),
]

ARCHS: dict[str, Arch] = {a.name: a for a in _ENTRIES}


def get_arch(name: str, **vit_overrides) -> Arch:
    """Registry entry `name`, its ViTConfig optionally overridden (e.g. depth=2, dtype='bfloat16')."""
    if name not in ARCHS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(ARCHS))}")
    arch = ARCHS[name]
    if not vit_overrides:
        return arch
    unknown = set(vit_overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        raise TypeError(f"unknown ViTConfig fields {sorted(unknown)} for model {name!r}")
    return dataclasses.replace(arch, vit=dataclasses.replace(arch.vit, **vit_overrides))


def create_model(name: str, *, rngs: nnx.Rngs, **vit_overrides) -> VisionTransformer:
    """Randomly initialised `VisionTransformer` for registry entry `name` (ViTConfig fields overridable)."""
    return VisionTransformer(get_arch(name, **vit_overrides).vit, rngs=rngs)


def embed(arch: Arch, out: ViTOutput) -> jax.Array:
    """The embedding users take, `[B, arch.embed_dim]`."""
    if arch.embedding == "cls_mean_patch":
        return jnp.concatenate([out.cls, out.patches.mean(axis=(1, 2))], axis=-1)
    return out.pooled


def normalize(arch: Arch, images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 RGB `[..., 3]` in 0..255 -> `(x / 255 - mean) / std` in the architecture's compute dtype."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(arch.mean, jnp.float32)) / jnp.asarray(arch.std, jnp.float32)
    return x.astype(arch.vit.dtype)
