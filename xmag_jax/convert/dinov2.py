"""DINOv2's and XMAG's released weights -> timm VisionTransformer key names.

DINOv2 names its ViT parameters as timm does (`blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
mlp.fc2,ls2.gamma}`, `patch_embed.proj`, `cls_token`, `pos_embed`, `norm`), so one reader serves:
- torch.hub `dinov2_vit{s,b}14_pretrain.pth`: a bare state dict with `mask_token` [1, D] (masked-image
  modelling, unused at inference: dropped with a note) and `pos_embed` [1, 1 + 37*37, D] for 518 px;
- timm `vit_{small,base}_patch14_dinov2.lvd142m` `model.safetensors`: the same tensors without `mask_token`;
- XMAG's released model (github.com/AI4Path-Lab/XMAG `encoding/encode.py`): `{"state_dict": {"model.<DINOv2
  key>": tensor}}` (`timm_io.read_state_dict` unwraps `state_dict`), or those keys under `student_ema.model.`
  (the EMA student of a training checkpoint; the other modules' tensors are left out with a note);
- any timm VisionTransformer state dict (bare keys).
For registry entries with `dinov2_pos_embed` a position table of another grid is resampled once, here, to the
entry's grid exactly as the official DINOv2 code resamples it on every forward at that input size.
"""

from __future__ import annotations

import math

import numpy as np

from xmag_jax.models.pos_embed import dinov2_resample_pos_embed
from xmag_jax.models.registry import Arch

PATCH_EMBED = "patch_embed.proj.weight"
RELEASE_PREFIXES = ("student_ema.model.", "model.")  # tried in this order, then bare keys


def prefix(state_dict: dict[str, np.ndarray]) -> str | None:
    """The prefix under which `state_dict` holds a timm/DINOv2 ViT ('' for bare keys), or None if it holds none."""
    return next((p for p in RELEASE_PREFIXES + ("",) if p + PATCH_EMBED in state_dict), None)


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def to_timm(state_dict: dict[str, np.ndarray], arch: Arch, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The timm-named tensors of a DINOv2 / XMAG release / timm state dict for `arch`, and notes (one line each)
    on what was dropped or resampled. `source` names the file in the notes."""
    p = prefix(state_dict)
    assert p is not None, "caller checks prefix() first"
    out = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
    notes = []
    others = sorted(k for k in state_dict if not k.startswith(p))
    if others:
        notes.append(f"{source}: model under {p!r}; left out {len(others)} other tensors: {_listing(others)}")
    if "mask_token" in out:
        notes.append(f"{source}: dropped mask_token {list(out.pop('mask_token').shape)} "
                     "(DINOv2's masked-image-modelling token, unused at inference)")
    pos = out.get("pos_embed")
    if arch.dinov2_pos_embed and pos is not None and pos.ndim == 3 and pos.shape[-1] == arch.vit.embed_dim:
        grid = arch.vit.img_size // arch.vit.patch_size
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1 and side != grid:
            patches = dinov2_resample_pos_embed(np.asarray(pos[:, 1:], np.float32), grid)
            out["pos_embed"] = np.concatenate([np.asarray(pos[:, :1], np.float32), patches], axis=1)
            notes.append(f"{source}: pos_embed {list(pos.shape)} ({side}x{side} patches, "
                         f"{side * arch.vit.patch_size} px) resampled to {grid}x{grid} ({arch.vit.img_size} px) as "
                         f"the official DINOv2 code does (bicubic, scale factor ({grid} + 0.1) / {side}, no antialias)")
    return out, notes
