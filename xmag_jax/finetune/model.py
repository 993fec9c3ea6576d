"""The end-to-end model (student + GatedABMIL), its optimizer groups, memory model and jitted functions.

Parameter groups by depth: layer 0 = patch embedding, class/register tokens and position embedding,
layer i = block i - 1 (1..depth), layer depth + 1 = the final norms; the head is its own group.
Layer l trains at `backbone_lr * layer_decay ** (depth + 1 - l)` (the final norms at `backbone_lr`);
`freeze_blocks = N` freezes layers 0..N (no gradient is computed for them); -1 freezes the student.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xmag_jax import models, sharding
from xmag_jax.errors import ConfigError
from xmag_jax.eval.mil import GatedABMIL
from xmag_jax.models import checkpoint
from xmag_jax.models.registry import Arch

GiB = 1 << 30


class InputStats(nnx.Variable):
    """Fixed (never trained) per-dimension statistics of the head's input."""


class E2EModel(nnx.Module):
    """`backbone` (the student ViT) and `head` (GatedABMIL over its embeddings standardised as
    `(embedding - input_mean) / input_scale`, both `[D]` fixed; identity unless `set_input_stats`)."""

    def __init__(self, backbone: models.VisionTransformer, head: GatedABMIL, dim: int):
        self.backbone, self.head = backbone, head
        self.input_mean = InputStats(jnp.zeros((dim,), jnp.float32))
        self.input_scale = InputStats(jnp.ones((dim,), jnp.float32))

    def set_input_stats(self, mean: Any, scale: Any) -> None:
        self.input_mean.value = jnp.asarray(mean, jnp.float32)
        self.input_scale.value = jnp.asarray(scale, jnp.float32)


def read_init_arch(config: ml_collections.ConfigDict) -> Arch:
    """The student's architecture from `model.init`, with the run's compute dtype and remat; ConfigError
    for a missing checkpoint or an unknown architecture."""
    try:
        return checkpoint.read_arch(config.model.init, dtype=config.model.dtype, remat=bool(config.model.remat),
                                    scan_layers=False)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise ConfigError(f"config.model.init={config.model.init}: {err}") from None


def build(config: ml_collections.ConfigDict, arch: Arch, num_classes: int, seed: int) -> E2EModel:
    """The student restored from `model.init` and a fresh head seeded with `seed` (the frozen baseline's seed)."""
    abstract = nnx.eval_shape(lambda: models.VisionTransformer(arch.vit, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    backbone = nnx.merge(graphdef, checkpoint.load_params(config.model.init, params), rest)
    head = GatedABMIL(arch.embed_dim, num_classes, hidden=config.head.hidden, attn_dim=config.head.attn_dim,
                      dropout=config.head.dropout, rngs=nnx.Rngs(seed))
    return E2EModel(backbone, head, arch.embed_dim)


def random_model(config: ml_collections.ConfigDict, arch: Arch, num_classes: int, seed: int) -> E2EModel:
    """A randomly initialised student (`arch`) and head, for benchmarks and compile-only reports."""
    head = GatedABMIL(arch.embed_dim, num_classes, hidden=config.head.hidden, attn_dim=config.head.attn_dim,
                      dropout=config.head.dropout, rngs=nnx.Rngs(seed))
    return E2EModel(models.VisionTransformer(arch.vit, rngs=nnx.Rngs(seed)), head, arch.embed_dim)


def layer_of(path: tuple, depth: int) -> int | None:
    """Optimizer group of a parameter path: None for the head, else the layer 0..depth + 1 (module doc)."""
    if path[0] == "head":
        return None
    if path[1] == "blocks":
        return int(path[2]) + 1
    if path[1] in ("norm", "fc_norm"):
        return depth + 1
    return 0


def trainable_filter(depth: int, freeze_blocks: int) -> Callable[[tuple, Any], bool]:
    """nnx filter of the parameters that train (see the module doc)."""
    last_frozen = depth + 1 if freeze_blocks < 0 else (freeze_blocks if freeze_blocks > 0 else -1)

    def keep(path: tuple, value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        layer = layer_of(path, depth)
        return layer is None or layer > last_frozen
    return keep


def _key_path(kp: tuple) -> tuple:
    return tuple(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k.name for k in kp)


def optimizer(config: ml_collections.ConfigDict, trainable: nnx.State, depth: int, total_steps: int
              ) -> optax.GradientTransformation:
    """Clip, then AdamW per group with warmup-cosine schedules scaled by group (head_lr / layer decay)."""
    warmup = int(config.optim.warmup_fraction * total_steps)

    def schedule(peak: float) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))

    def group(kp, _) -> str:
        layer = layer_of(_key_path(kp), depth)
        return "head" if layer is None else f"layer_{layer}"

    labels = jax.tree_util.tree_map_with_path(group, trainable)
    peaks = {"head": config.optim.head_lr}
    peaks.update({f"layer_{layer}": config.optim.backbone_lr * config.optim.layer_decay ** (depth + 1 - layer)
                  for layer in range(depth + 2)})
    decay_mask = jax.tree.map(lambda v: v.ndim >= 2, trainable)
    transforms = {name: optax.adamw(schedule(peak), weight_decay=config.optim.weight_decay, mask=decay_mask)
                  for name, peak in peaks.items()}
    return optax.chain(optax.clip_by_global_norm(config.optim.clip_norm), optax.multi_transform(transforms, labels))


def activation_bytes_per_tile(vit: models.ViTConfig, patch_px: int, remat: bool) -> int:
    """Activation memory one training tile holds for the backward pass, bytes: per block the saved tensors
    (norm/qkv/attention/MLP, ~ tokens x (11 D + 2 mlp_hidden + heads x tokens) values); with remat only each
    block's input plus one block's full set while it is recomputed."""
    tokens = (patch_px // vit.patch_size) ** 2 + vit.num_prefix_tokens
    width = jnp.dtype(vit.dtype).itemsize
    block = tokens * (11 * vit.embed_dim + 2 * vit.mlp_hidden + vit.num_heads * tokens) * width
    if remat:
        return vit.depth * tokens * vit.embed_dim * width + block
    return vit.depth * block


def device_memory_bytes(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(bytes per device, where that number comes from): config.memory_gib, the device's limit, or host RAM."""
    if config.memory_gib > 0:
        return int(config.memory_gib * GiB), "config.memory_gib"
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), device.device_kind
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(jax.local_device_count(), 1), \
        f"{device.platform} host RAM / {jax.local_device_count()} devices"


def check_memory(config: ml_collections.ConfigDict, arch: Arch, patch_px: int, num_devices: int) -> dict:
    """ConfigError naming the estimate when a training step's tiles cannot fit a device; returns the estimate."""
    tiles = config.train.slides_per_step // config.train.grad_accum * config.train.tiles_per_slide
    per_device = -(-tiles // num_devices)
    per_tile = activation_bytes_per_tile(arch.vit, patch_px, bool(config.model.remat))
    params = sum(x.size for x in jax.tree.leaves(nnx.eval_shape(
        lambda: models.VisionTransformer(arch.vit, rngs=nnx.Rngs(0)))))
    estimate = per_device * per_tile + 16 * params  # + f32 params, grads and two Adam moments
    limit, source = device_memory_bytes(config)
    out = {"tiles_per_device": per_device, "bytes_per_tile": per_tile, "estimate_bytes": estimate,
           "limit_bytes": limit}
    if estimate > 0.9 * limit:
        raise ConfigError(
            f"config.train.tiles_per_slide={config.train.tiles_per_slide}: a step holds {per_device} tiles per "
            f"device x {per_tile / 2**20:.1f} MiB activations/tile ({'with' if config.model.remat else 'without'} "
            f"remat, {arch.vit.dtype}) + {16 * params / GiB:.2f} GiB weights/optimizer = {estimate / GiB:.1f} GiB, "
            f"more than 90% of {limit / GiB:.1f} GiB ({source}); lower tiles_per_slide or slides_per_step, raise "
            f"train.grad_accum or turn model.remat on")
    return out


@dataclasses.dataclass
class Functions:
    """Jitted functions over split model state (`graphdef`, trainable, frozen params, rest)."""

    graphdef: Any
    train_step: Callable
    embed: Callable
    batch_sharding: NamedSharding
    chunk_sharding: NamedSharding
    replicated: NamedSharding


def split(model: E2EModel, keep: Callable) -> tuple[Any, nnx.State, nnx.State, nnx.State]:
    return nnx.split(model, keep, nnx.Param, ...)


def make_functions(graphdef: Any, arch: Arch, tx: optax.GradientTransformation, mesh: Mesh) -> Functions:
    """`train_step(trainable, opt_state, frozen, rest, images, mask, labels, key) -> (trainable, opt_state,
    metrics)` over a `data.Batch` (`images [A, M*T, P, P, 3]` sharded over the tiles on the data axes) and
    `embed(trainable, frozen, rest, tiles [C, P, P, 3]) -> [C, D]` float32 head inputs (the standardised
    embeddings; eval mode, no augmentation)."""
    rep = sharding.replicated(mesh)
    batch = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    chunk = NamedSharding(mesh, P(sharding.BATCH_AXES))

    def features(model: E2EModel, images: jax.Array) -> jax.Array:
        out = model.backbone(models.normalize(arch, images))
        return (models.embed(arch, out).astype(jnp.float32) - model.input_mean.value) / model.input_scale.value

    def micro_loss(trainable, frozen, rest, images, mask, labels, key):
        model = nnx.merge(graphdef, trainable, frozen, rest, copy=True)
        nnx.reseed(model.head, default=key)  # dropout masks: a function of (seed, fold, step, micro-step)
        m, t = mask.shape
        emb = features(model, images).reshape(m, t, -1)
        logits, _ = model.head(emb, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(trainable, opt_state, frozen, rest, images, mask, labels, key):
        grad_fn = jax.value_and_grad(micro_loss)

        def micro(total, xs):
            img, msk, lab, k = xs
            loss, grads = grad_fn(trainable, frozen, rest, img, msk, lab, k)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        keys = jax.random.split(key, images.shape[0])
        (loss, grads), _ = jax.lax.scan(micro, zeros, (images, mask, labels, keys))
        accum = images.shape[0]
        loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def embed(trainable, frozen, rest, tiles):
        model = nnx.merge(graphdef, trainable, frozen, rest)
        return features(model, tiles)

    return Functions(
        graphdef=graphdef,
        train_step=jax.jit(train_step, in_shardings=(rep, rep, rep, rep, batch, rep, rep, rep),
                           out_shardings=(rep, rep, rep), donate_argnums=(0, 1)),
        embed=jax.jit(embed, in_shardings=(rep, rep, rep, chunk), out_shardings=rep),
        batch_sharding=batch, chunk_sharding=chunk, replicated=rep)
