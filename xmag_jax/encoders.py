"""Encoders: a ViT plus the embedding users take, from a model checkpoint, a timm local dir or a registry
name with weights; a jitted forward on uint8 tiles, data-parallel over the local devices.

Used by `xmag_jax.embed` (slides), `xmag_jax.eval.pair_features` (tile pairs) and `xmag_jax.bench embed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import jax
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xmag_jax import models
from xmag_jax.models import checkpoint


@dataclasses.dataclass
class Encoder:
    """A ViT and the embedding users take; `forward(uint8 [B, H, W, 3]) -> float32 [B, E]` is jitted and
    data-parallel over the local devices (B must divide by `len(jax.local_devices())`)."""

    name: str
    arch: models.Arch
    model: models.VisionTransformer

    def __post_init__(self):
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(self.model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        arch = self.arch

        def forward(state, images, with_tokens):
            out = nnx.merge(graphdef, state)(models.normalize(arch, images))
            emb = models.embed(arch, out).astype(np.float32)
            return (emb, out.patches.astype(np.float32)) if with_tokens else emb

        self._forward = jax.jit(forward, static_argnums=2)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def forward(self, images: np.ndarray) -> jax.Array:
        """`uint8 [B, H, W, 3]` -> embedding `float32 [B, E]` (a device array; dispatch is asynchronous)."""
        return self._forward(self._state, jax.device_put(images, self._batch_sharding), False)

    def forward_with_tokens(self, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """`uint8 [B, H, W, 3]` -> (embedding `[B, E]`, patch tokens `[B, H/p, W/p, D]`), float32."""
        return self._forward(self._state, jax.device_put(images, self._batch_sharding), True)


def weights_fingerprint(encoder: Encoder) -> str:
    """16 hex digits of sha256 over every parameter's path, dtype, shape and bytes: new weights at the same
    path give a new fingerprint. Reads all parameters to the host once: 0.7-0.9 s for a ViT-B (86 M params),
    2.4-3 s for a ViT-L (303 M) on a busy 2-core CPU host."""
    return params_fingerprint(nnx.state(encoder.model, nnx.Param))


def params_fingerprint(params: nnx.State) -> str:
    """`weights_fingerprint` of a model's `nnx.Param` state (e.g. the distillation teacher's)."""
    digest = hashlib.sha256()
    for path, param in sorted(nnx.to_flat_state(params), key=lambda kv: kv[0]):
        value = np.ascontiguousarray(jax.device_get(param[...]))
        digest.update(f"{'/'.join(map(str, path))}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def load_encoder(*, checkpoint_dir: str | None = None, timm_dir: str | None = None, model: str | None = None,
                 weights: str | None = None, random_init: bool = False, seed: int = 0,
                 dtype: str | None = None, **vit_overrides) -> Encoder:
    """An encoder from exactly one source: a model checkpoint dir (`models.checkpoint`), a timm local dir
    exported by `xmag_jax.convert export` (`config.json` + `model.safetensors`), or a registry name with
    a weights file (a released file `xmag_jax.convert import` reads: timm `.safetensors`/`.bin`, DINOv2 `.pth`,
    XMAG's release `.ckpt`; or a model checkpoint dir) or `random_init`.
    `dtype` sets the compute dtype (e.g. 'bfloat16'); `vit_overrides` other ViTConfig fields (e.g. depth)."""
    sources = [s for s in (checkpoint_dir, timm_dir, model) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of --checkpoint, --timm_dir, --model")
    overrides = dict(vit_overrides, **({"dtype": dtype} if dtype else {}))
    if checkpoint_dir:
        net, arch = checkpoint.load_model(checkpoint_dir, dtype=dtype)
        return Encoder(f"{arch.name}:{os.path.abspath(checkpoint_dir)}", arch, net)
    if timm_dir:
        arch = _arch_of_timm_dir(pathlib.Path(timm_dir), overrides)
        net = _from_timm_weights(arch, pathlib.Path(timm_dir) / "model.safetensors")
        return Encoder(f"{arch.name}:{os.path.abspath(timm_dir)}", arch, net)
    if weights and random_init:
        raise ValueError("--weights and --random_init exclude each other")
    if weights:
        if os.path.isdir(weights):
            net, arch = checkpoint.load_model(weights, dtype=dtype)
            if arch.name != model:
                raise ValueError(f"{weights}: checkpoint holds {arch.name!r}, not --model {model!r}")
        else:
            arch = models.get_arch(model, **overrides)
            net = _from_timm_weights(arch, pathlib.Path(weights))
        return Encoder(f"{model}:{os.path.abspath(weights)}", arch, net)
    if not random_init:
        raise ValueError(f"--model {model} needs --weights FILE (or --random_init for a random-init baseline)")
    arch = models.get_arch(model, **overrides)
    net = models.create_model(model, rngs=nnx.Rngs(seed), **overrides)
    return Encoder(f"{model}:random-init-seed{seed}", arch, net)


def _from_timm_weights(arch: models.Arch, path: pathlib.Path) -> models.VisionTransformer:
    """Through `convert import`'s reader: timm, DINOv2, XMAG release or transformers Dinov2 weights."""
    from xmag_jax.convert import timm_io

    return timm_io.load_weights(arch, path)


def _arch_of_timm_dir(directory: pathlib.Path, overrides: dict) -> models.Arch:
    """The registry entry named in `config.json`'s `xmag_jax.arch`, with the sizes of its `model_args`."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist "
                                "(expected a timm local dir: config.json + model.safetensors)")
    config = json.loads(config_file.read_text())
    name = config.get("xmag_jax", {}).get("arch")
    if not name:
        raise ValueError(f"{config_file}: no 'xmag_jax.arch' entry (not written by `xmag_jax.convert export`); "
                         "use --model NAME --weights DIR/model.safetensors")
    fields = {f.name for f in dataclasses.fields(models.ViTConfig)}
    sizes = {k: v for k, v in config.get("model_args", {}).items() if k in fields}
    return models.get_arch(name, **{**sizes, **overrides})


SOURCE_FLAGS = ("checkpoint", "timm_dir", "model")  # exactly one: `cli.Command(..., one_of=(SOURCE_FLAGS,))`


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of `from_flags`: where the encoder comes from, its seed and compute dtype."""
    flags.DEFINE_string("checkpoint", None, "model checkpoint directory (models.checkpoint / trainer export)",
                        flag_values=fv)
    flags.DEFINE_string("timm_dir", None, "timm local dir: config.json + model.safetensors", flag_values=fv)
    flags.DEFINE_string("model", None, "registry name (with --weights FILE, or --random_init)", flag_values=fv)
    flags.DEFINE_string("weights", None, "weights for --model: a file `xmag_jax.convert import` reads (timm, "
                        "DINOv2 .pth, XMAG release .ckpt) or a model checkpoint dir", flag_values=fv)
    flags.DEFINE_bool("random_init", False, "random-init --model (a baseline)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of --random_init", flag_values=fv)
    flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the model's)", flag_values=fv)


def from_flags(fv: flags.FlagValues) -> Encoder:
    return load_encoder(checkpoint_dir=fv.checkpoint, timm_dir=fv.timm_dir, model=fv.model, weights=fv.weights,
                        random_init=fv.random_init, seed=fv.seed, dtype=fv.dtype)
