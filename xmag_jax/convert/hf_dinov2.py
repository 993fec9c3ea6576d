"""Hugging Face `transformers` Dinov2Model state dicts -> timm VisionTransformer key names.

Phikon-v2 (huggingface.co/owkin/phikon-v2) is released as a transformers Dinov2Model, not as timm weights. Its
`model.safetensors` names `encoder.layer.N.attention.attention.{query,key,value}` and
`encoder.layer.N.attention.output.dense`; transformers >= 5 saves the same tensors as `attention.{q,k,v,o}_proj`.
Both are read. The three projections become timm's fused `qkv` (rows q, k, v), `layer_scaleN.lambda1` becomes
`lsN.gamma`, `layernorm` the final `norm`; `mask_token` (used only for masked pre-training) is dropped. At the
checkpoint's native size the two models compute the same CLS (`last_hidden_state[:, 0]`); HF's own position-embedding
interpolation at other sizes differs from timm's, which this project follows.
"""

from __future__ import annotations

import re

import numpy as np

from xmag_jax.convert.mapping import WeightsError

_EMBEDDINGS = "embeddings.patch_embeddings.projection.weight"
_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_LAYER_RENAMES = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
}
_QKV = {  # HF projection name -> (q|k|v) for the old and the transformers >= 5 layouts
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}


def is_hf_dinov2(state_dict: dict[str, np.ndarray]) -> bool:
    """True when `state_dict` has a transformers Dinov2 patch embedding (under any prefix, e.g. `dinov2.`)."""
    return any(k.endswith(_EMBEDDINGS) for k in state_dict)


def _backbone(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Dinov2Model's tensors without the prefix its patch embedding has (`dinov2.` in a
    Dinov2ForImageClassification); keys outside that prefix (a classification head) are not the backbone's."""
    prefix = next(k for k in state_dict if k.endswith(_EMBEDDINGS))[:-len(_EMBEDDINGS)]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def to_timm(state_dict: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The timm-named state dict of a transformers Dinov2Model's; `source` names the file in errors.

    Raises WeightsError listing every key it cannot place (SwiGLU Dinov2 variants, heads, ...) and every layer whose
    q, k or v projection is missing.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in _backbone(state_dict).items():
        if key == "embeddings.mask_token":
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value
            continue
        m = _LAYER.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        layer, (module, _, leaf) = m.group(1), m.group(2).rpartition(".")
        if module in _LAYER_RENAMES:
            out[f"blocks.{layer}.{_LAYER_RENAMES[module]}.{leaf}"] = value
        elif module in _QKV:
            qkv.setdefault((layer, leaf), {})[_QKV[module]] = value
        elif module in ("layer_scale1", "layer_scale2") and leaf == "lambda1":
            out[f"blocks.{layer}.ls{module[-1]}.gamma"] = value
        else:
            unknown.append(key)
    incomplete = sorted(f"encoder.layer.{layer} {leaf}: has {sorted(parts)}"
                        for (layer, leaf), parts in qkv.items() if set(parts) != {"q", "k", "v"})
    if unknown or incomplete:
        raise WeightsError(f"{source}: transformers Dinov2 checkpoint with keys that have no timm ViT counterpart "
                         f"{sorted(unknown)}; q/k/v projections incomplete: {incomplete}")
    for (layer, leaf), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out
