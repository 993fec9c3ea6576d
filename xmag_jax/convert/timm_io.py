"""timm <-> Flax conversion: import downloaded timm weights into a model checkpoint, export one to timm.

Import reads `model.safetensors`, or a PyTorch file (`pytorch_model.bin`, DINOv2's `.pth`, XMAG's `.ckpt`)
through `torch.load(weights_only=True)` (torch is imported only for those), in any layout `layouts` understands:
timm's, DINOv2's, XMAG's release, a transformers Dinov2Model's (Phikon-v2). Export writes
`config.json` + `model.safetensors` that `timm.create_model("local-dir:DIR", pretrained=True)` loads without
xmag_jax installed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from xmag_jax import atomic
from xmag_jax.convert import layouts
from xmag_jax.convert.mapping import WeightsError, from_timm, to_timm
from xmag_jax.models.checkpoint import load_model, save_model
from xmag_jax.models.registry import Arch, get_arch, timm_model_args
from xmag_jax.models.vit import VisionTransformer


class NonFiniteWeights(WeightsError):
    """Weights holding NaN or Inf."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a `.safetensors` or PyTorch `.bin`/`.pth`/`.pt`/`.ckpt` file as numpy arrays (bfloat16 as
    ml_dtypes). A PyTorch file holds a flat state dict, or a checkpoint dict whose `state_dict` entry is one
    (XMAG's release, Lightning); it is read with `torch.load(weights_only=True)` only. Raises `WeightsError`
    for an unreadable file and `NonFiniteWeights`, naming the keys, for NaN/Inf values."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="flax") as f:
                tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    elif path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
        tensors = _read_torch(path)
    else:
        raise WeightsError(f"weights file {path}: expected a .safetensors or PyTorch .bin/.pth/.pt/.ckpt file")
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        raise NonFiniteWeights(f"{path}: {len(bad)} tensors hold NaN or Inf: {', '.join(bad[:10])}"
                               f"{', ...' if len(bad) > 10 else ''}")
    return tensors


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; corrupt zips raise RuntimeError
        raise WeightsError(f"{path}: not loadable with torch.load(weights_only=True) ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a flat state dict of tensors (or a dict with one under 'state_dict'), "
                           f"got {type(obj).__name__}")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}


def _print_note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def flax_from_state_dict(arch: Arch, state_dict: dict[str, np.ndarray], source: str) -> VisionTransformer:
    """Build `arch`'s Flax model from a timm state dict (numpy arrays); `source` names it in errors."""
    abstract = nnx.eval_shape(lambda: VisionTransformer(arch.vit, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(params)
    converted = from_timm(state_dict, target, source=source)
    converted = jax.tree.map(lambda x, t: jnp.asarray(np.asarray(x, np.float32), t.dtype), converted, target)
    nnx.replace_by_pure_dict(params, converted)
    return nnx.merge(graphdef, params, rest)


def load_weights(arch: Arch, weights: str | os.PathLike,
                 note: Callable[[str], None] = _print_note) -> VisionTransformer:
    """`arch`'s Flax model from a released weights file in any layout `layouts.to_timm_layout` understands (timm,
    DINOv2 torch.hub, XMAG release, transformers Dinov2Model); `note` receives one line per tensor dropped or
    resampled. The one reader behind `convert import` and `encoders.load_encoder(model=..., weights=FILE)`."""
    state_dict, notes = layouts.to_timm_layout(read_state_dict(weights), arch, source=str(weights))
    for line in notes:
        note(line)
    return flax_from_state_dict(arch, state_dict, source=str(weights))


def import_timm(name: str, weights: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                note: Callable[[str], None] = _print_note,
                **vit_overrides: Any) -> tuple[VisionTransformer, epath.Path]:
    """Convert released weights (see `load_weights`) for registry entry `name` (ViTConfig fields overridable, e.g.
    depth=2) into an Orbax model checkpoint at `out`. Returns the model and the checkpoint path."""
    arch = get_arch(name, **vit_overrides)
    model = load_weights(arch, weights, note=note)
    return model, save_model(out, model, name, overwrite=overwrite)


def timm_config(arch: Arch) -> dict[str, Any]:
    """timm hub-style `config.json` for `arch` (num_classes 0: the model returns features)."""
    cfg = arch.vit
    size = [3, cfg.img_size, cfg.img_size]
    return {
        "architecture": arch.timm_arch,
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": cfg.global_pool,
        "model_args": timm_model_args(cfg),
        "pretrained_cfg": {
            "tag": f"xmag_jax.{arch.name}",
            "input_size": size,
            "fixed_input_size": not cfg.dynamic_img_size,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(arch.mean),
            "std": list(arch.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "xmag_jax": {"arch": arch.name, "embedding": arch.embedding, "embed_dim": arch.embed_dim},
    }


def export_timm(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> epath.Path:
    """Write `out/config.json` + `out/model.safetensors` (float32) for the model checkpoint; the directory
    (local or gs://) is written with `atomic.target`, `config.json` last. Returns the absolute output path."""
    from safetensors.numpy import save_file

    out = atomic.as_path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export directory {out} already exists")
    model, arch = load_model(checkpoint)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state_dict = to_timm(params)
    with atomic.target(out, directory=True, marker="config.json") as tmp:
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(timm_config(arch), indent=2))
    return out
