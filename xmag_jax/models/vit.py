"""One Flax NNX Vision Transformer matching timm's `VisionTransformer` number for number.

Images are NHWC `[B, H, W, 3]`, already normalised (see `registry.normalize`). Token order inside the
model is timm's `[cls, registers, patches]`; module and parameter names mirror timm's state-dict keys
(`patch_embed`, `cls_token`, `reg_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,
mlp.fc1,mlp.fc2,ls2}`, `norm`, `fc_norm`) so the conversion table in `xmag_jax.convert` stays trivial.

Parameters carry logical axis names: `embed` (model width D), `mlp` (MLP hidden), `heads` (attention
qkv output / proj input), `layers` (the stacked block axis of a scanned model), None elsewhere.
`xmag_jax.sharding` maps them to mesh axes.

`scan_layers=True` (MaxText style) creates the blocks once with stacked parameters (`blocks.attn.qkv.kernel
[depth, D, 3D]`) and runs them under a `jax.lax.scan`, so the step compiles one block instead of `depth`.
It is a way of running the model, not an architecture: model checkpoints, timm import/export and
everything a user sees keep timm's per-block layout (`blocks.N...`); `stack_blocks` / `unstack_blocks`
convert at that boundary.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xmag_jax.models.pos_embed import resample_pos_embed

MLP_LAYERS = ("gelu", "swiglu_packed")
GLOBAL_POOLS = ("token", "avg", "")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT. Sizes in px; `dtype` is the compute dtype, `param_dtype` the storage dtype."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_layer: str = "gelu"
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    init_values: float | None = None
    global_pool: str = "token"
    fc_norm: bool | None = None
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        if self.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"ViTConfig.mlp_layer={self.mlp_layer!r}; expected one of {MLP_LAYERS}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"ViTConfig.global_pool={self.global_pool!r}; expected one of {GLOBAL_POOLS}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.global_pool='token' needs class_token=True")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size={self.img_size} px is not divisible by patch_size={self.patch_size} px")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.mlp_layer == "swiglu_packed" and self.mlp_hidden % 2:
            raise ValueError(f"swiglu_packed needs an even MLP hidden size, got {self.mlp_hidden}")

    @property
    def grid_size(self) -> int:
        """Native token grid side (img_size / patch_size)."""
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_hidden(self) -> int:
        """fc1 width, timm's rule `int(embed_dim * mlp_ratio)` (packed gate+value for SwiGLUPacked)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def use_fc_norm(self) -> bool:
        """timm: `fc_norm` None means enabled for average pooling; the final `norm` is then skipped."""
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    @property
    def pos_embed_len(self) -> int:
        n = self.grid_size ** 2
        return n if self.no_embed_class else n + self.num_prefix_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ViTOutput(NamedTuple):
    """pooled `[B, D]` (timm `forward_head(pre_logits=True)`, or the class token when global_pool=''),
    cls `[B, D]` or None, registers `[B, R, D]`, patches `[B, H/p, W/p, D]` (after the final norm)."""

    pooled: jax.Array
    cls: jax.Array | None
    registers: jax.Array
    patches: jax.Array


def _param(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


_normal = nnx.initializers.truncated_normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _linear(din: int, dout: int, axes: tuple, cfg: ViTConfig, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_param(_normal, *axes), bias_init=_param(_zeros, axes[1]), rngs=rngs)


def _layer_norm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.embed_dim, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        use_fast_variance=False, scale_init=_param(_ones, "embed"), bias_init=_param(_zeros, "embed"),
        rngs=rngs)


class LayerScale(nnx.Module):
    def __init__(self, cfg: ViTConfig):
        init = _param(nnx.initializers.constant(cfg.init_values), "embed")
        self.gamma = nnx.Param(init(jax.random.key(0), (cfg.embed_dim,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.qkv = _linear(d, 3 * d, ("embed", "heads"), cfg, rngs, bias=cfg.qkv_bias)
        self.proj = _linear(d, d, ("heads", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim] each
        # What `jax.nn.dot_product_attention`'s XLA path computes (logits and softmax in float32), with timm's
        # scaling of q before the product: the library call multiplies the [B, heads, N, N] logits by a
        # broadcast scale, a separate pass over the largest tensor of the block on CPU.
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnts,bsnh->btnh", probs, v)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """GELU (exact erf) MLP, or timm's SwiGLUPacked: SiLU(first half of fc1) * second half."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.swiglu = cfg.mlp_layer == "swiglu_packed"
        h = cfg.mlp_hidden
        self.fc1 = _linear(cfg.embed_dim, h, ("embed", "mlp"), cfg, rngs)
        self.fc2 = _linear(h // 2 if self.swiglu else h, cfg.embed_dim, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(x)
        if self.swiglu:
            gate, value = jnp.split(x, 2, axis=-1)
            x = jax.nn.silu(gate) * value
        else:
            x = jax.nn.gelu(x, approximate=False)
        return self.fc2(x)


class Block(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ls1 = LayerScale(cfg) if cfg.init_values else None
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)
        self.ls2 = LayerScale(cfg) if cfg.init_values else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.attn(self.norm1(x))
        x = x + (self.ls1(y) if self.ls1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + (self.ls2(y) if self.ls2 is not None else y)


def _apply_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


_apply_block_remat = nnx.remat(_apply_block)


def _scan_blocks(blocks: Block, x: jax.Array, remat: bool) -> jax.Array:
    """`x` through the stacked blocks with `jax.lax.scan` over their `[depth, ...]` state. Split/merge by hand
    rather than `nnx.scan`: the model may be merged from parameters of an outer trace (a teacher inside the
    step's gradient-accumulation scan), which NNX's own transforms refuse."""
    graphdef, state = nnx.split(blocks)

    def body(h: jax.Array, block_state: nnx.State) -> tuple[jax.Array, None]:
        return nnx.merge(graphdef, block_state)(h), None

    x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, state)
    return x


def _stacked_blocks(cfg: ViTConfig, rngs: nnx.Rngs) -> Block:
    """One `Block` whose parameters carry a leading `[depth]` axis (logical name `layers`)."""

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return create(rngs)


def unstack_blocks(params: dict, depth: int) -> dict:
    """Pure parameter dict of a scanned model -> timm's per-block layout (`blocks: {0: ..., 1: ...}`)."""
    if "blocks" not in params or _is_per_block(params["blocks"]):
        return params
    stacked = params["blocks"]
    return {**params, "blocks": {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)}}


def stack_blocks(params: dict) -> dict:
    """Pure parameter dict in timm's per-block layout -> the scanned model's (`[depth, ...]` leaves)."""
    if "blocks" not in params or not _is_per_block(params["blocks"]):
        return params
    blocks = params["blocks"]
    ordered = [blocks[i] for i in sorted(blocks)]
    return {**params, "blocks": jax.tree.map(lambda *a: jnp.stack(a), *ordered)}


def _is_per_block(blocks: dict) -> bool:
    return all(isinstance(k, int) for k in blocks)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p px patches -> D channels: `[B, H, W, 3]` -> `[B, H/p, W/p, D]`.

    The parameters are a stride-p convolution's (`proj.kernel [p, p, 3, D]`, timm's layout transposed), the
    computation one matmul of the flattened `[p·p·3]` patches with the flattened kernel: the same sums as the
    convolution, cheaper on CPU than XLA's strided convolution and its weight gradient.
    """

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(
            3, cfg.embed_dim, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_param(nnx.initializers.lecun_normal(), None, None, None, "embed"),
            bias_init=_param(_zeros, "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        conv = self.proj
        p = conv.kernel_size[0]
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, -1)
        kernel = conv.kernel[...].reshape(p * p * c, -1)
        patches, kernel = patches.astype(conv.dtype), kernel.astype(conv.dtype)
        return jnp.dot(patches, kernel) + conv.bias[...].astype(conv.dtype)


class VisionTransformer(nnx.Module):
    """`model(x)` with x `[B, H, W, 3]` normalised float; H, W multiples of patch_size (px) -> `ViTOutput`."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, rngs)
        token_init = _param(nnx.initializers.normal(1e-6), None, None, "embed")
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d), cfg.param_dtype)) if cfg.class_token else None
        self.reg_token = (nnx.Param(token_init(rngs.params(), (1, cfg.reg_tokens, d), cfg.param_dtype))
                          if cfg.reg_tokens else None)
        self.pos_embed = nnx.Param(_param(_normal, None, None, "embed")(
            rngs.params(), (1, cfg.pos_embed_len, d), cfg.param_dtype))
        self.blocks = (_stacked_blocks(cfg, rngs) if cfg.scan_layers
                       else nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)]))
        self.norm = None if cfg.use_fc_norm else _layer_norm(cfg, rngs)
        self.fc_norm = _layer_norm(cfg, rngs) if cfg.use_fc_norm else None

    def _check_size(self, h: int, w: int) -> tuple[int, int]:
        cfg = self.cfg
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"image size {h}x{w} px is not divisible by the patch size {cfg.patch_size} px")
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        if (gh, gw) != (cfg.grid_size, cfg.grid_size) and not cfg.dynamic_img_size:
            raise ValueError(
                f"image size {h}x{w} px differs from the native {cfg.img_size} px and dynamic_img_size=False; "
                "create the model with dynamic_img_size=True to resample position embeddings")
        return gh, gw

    def _embed_tokens(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, h, w, _ = x.shape
        gh, gw = self._check_size(h, w)
        x = self.patch_embed(x.astype(cfg.dtype)).reshape(b, gh * gw, cfg.embed_dim)
        n_pre = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        pos = self.pos_embed[...]
        if (gh, gw) != (cfg.grid_size, cfg.grid_size):
            pos = jnp.concatenate(
                [pos[:, :n_pre], resample_pos_embed(pos[:, n_pre:], (cfg.grid_size, cfg.grid_size), (gh, gw))],
                axis=1)
        pos = pos.astype(cfg.dtype)
        prefix = [t[...].astype(cfg.dtype) for t in (self.cls_token, self.reg_token) if t is not None]
        prefix = [jnp.broadcast_to(t, (b,) + t.shape[1:]) for t in prefix]
        if cfg.no_embed_class:
            return jnp.concatenate(prefix + [x + pos], axis=1)
        return jnp.concatenate(prefix + [x], axis=1) + pos

    def __call__(self, x: jax.Array) -> ViTOutput:
        cfg = self.cfg
        b, h, w, _ = x.shape
        gh, gw = self._check_size(h, w)
        x = self._embed_tokens(x)
        if cfg.scan_layers:
            x = _scan_blocks(self.blocks, x, cfg.remat)
        else:
            for block in self.blocks:
                x = _apply_block_remat(block, x) if cfg.remat else block(x)
        if self.norm is not None:
            x = self.norm(x)
        n_cls = int(cfg.class_token)
        cls = x[:, 0] if cfg.class_token else None
        registers = x[:, n_cls:cfg.num_prefix_tokens]
        patch_tokens = x[:, cfg.num_prefix_tokens:]
        if cfg.global_pool == "avg" or (cfg.global_pool == "" and not cfg.class_token):
            pooled = patch_tokens.mean(axis=1)
        else:
            pooled = cls
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        return ViTOutput(pooled, cls, registers, patch_tokens.reshape(b, gh, gw, cfg.embed_dim))
