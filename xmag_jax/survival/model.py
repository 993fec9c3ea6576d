"""The survival models (Flax NNX); each maps a padded batch of slides to `[B, n_out]` outputs.

Output 0 is the log-risk (Cox), output 1, when the binary head is on, the logit of "recurrence within T months".
A batch (`xmag_jax.survival.batching`) holds, for B slides padded to L tiles:
  `features [B, L, D]` tile embeddings, `words [B, L, W, Dw]` words per tile, `neighbours [B, L, 9]` row indices
  of each tile's 3 x 3 grid neighbourhood (-1: none), `centres [B, L, 2]` tile centres in µm relative to the
  slide's centroid, `mask [B, L]` real tiles, `local [B]` slides with more tiles than
  `model.global_attention_max_tiles`.

Models:
  * `SpatialRisk` (CellEcoNet-style): words of a tile and its 8 neighbours -> phrase transformer -> one phrase per
    tile; phrases + 2-D sinusoidal positions in µm -> sentence transformer (global attention, or attention within
    `window_um` µm for `local` slides) -> gated attention pooling -> outputs.
  * `TileTransformer` (TransMIL-like, no positions): tile embeddings -> transformer -> gated attention pooling.
  * `ABMILRisk`: `xmag_jax.eval.mil.GatedABMIL` on tile embeddings.
All three pool with `GatedABMIL`, so they differ only in the context a tile sees before pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xmag_jax.eval.mil import GatedABMIL
from xmag_jax.survival.slides import NEIGHBOUR_OFFSETS


class Block(nnx.Module):
    """Pre-norm transformer block: `x [B, T, d]`, `mask [B, 1, T, T]` (True = may attend) -> `[B, T, d]`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, int(dim * mlp_ratio), rngs=rngs)
        self.fc2 = nnx.Linear(int(dim * mlp_ratio), dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
        return x + self.dropout(self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)))))


def _blocks(n: int, dim: int, heads: int, mlp_ratio: float, dropout: float, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([Block(dim, heads, mlp_ratio, dropout, rngs=rngs) for _ in range(n)])


def sinusoid_2d(xy_um: jax.Array, dim: int, min_wavelength_um: float, max_wavelength_um: float) -> jax.Array:
    """2-D sinusoidal encoding of positions `[..., 2]` in µm -> `[..., dim]` (dim/4 wavelengths per axis,
    geometric from `min_wavelength_um` to `max_wavelength_um`; sin and cos of x, then of y)."""
    k = dim // 4
    wavelengths = min_wavelength_um * (max_wavelength_um / min_wavelength_um) ** (jnp.arange(k) / max(k - 1, 1))
    angles = 2 * jnp.pi * xy_um[..., :, None] / wavelengths  # [..., 2, k]
    enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., 2, 2k]
    return enc.reshape(*xy_um.shape[:-1], 4 * k)


class SpatialRisk(nnx.Module):
    """Words -> phrases (tile + 8 neighbours) -> sentence (slide, µm positions) -> pooled outputs `[B, n_out]`."""

    def __init__(self, word_dim: int, n_words: int, n_out: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d = cfg.dim
        if d % 4:
            raise ValueError(f"model.dim {d} must be a multiple of 4 (2-D sinusoidal positions)")
        self.window_um = float(cfg.window_um)
        self.wavelengths_um = (float(cfg.pos_min_wavelength_um), float(cfg.pos_max_wavelength_um))
        self.dim = d
        self.word_proj = nnx.Linear(word_dim, d, rngs=rngs)
        # One learned vector per (neighbour slot, word position): the layout of words in the 3 x 3 tiles.
        self.word_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (len(NEIGHBOUR_OFFSETS) * n_words, d)))
        self.phrase = _blocks(cfg.phrase_layers, d, cfg.phrase_heads, cfg.mlp_ratio, cfg.dropout, rngs)
        self.phrase_norm = nnx.LayerNorm(d, rngs=rngs)
        self.sentence = _blocks(cfg.sentence_layers, d, cfg.sentence_heads, cfg.mlp_ratio, cfg.dropout, rngs)
        self.sentence_norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = GatedABMIL(d, n_out, hidden=d, attn_dim=max(d // 2, 1), dropout=cfg.dropout, rngs=rngs)

    def phrases(self, words: jax.Array, neighbours: jax.Array) -> jax.Array:
        """`words [B, L, W, Dw]`, `neighbours [B, L, 9]` -> phrase embeddings `[B, L, d]`."""
        b, n_tiles, w, _ = words.shape
        x = self.word_proj(words)  # [B, L, W, d]
        present = neighbours >= 0
        x = jax.vmap(lambda xb, ib: xb[jnp.maximum(ib, 0)])(x, neighbours)  # [B, L, 9, W, d]
        x = x.reshape(b * n_tiles, -1, self.dim) + self.word_pos[...]
        tokens = jnp.repeat(present.reshape(b * n_tiles, -1), w, axis=1)  # [B*L, 9W]
        mask = tokens[:, None, None, :]
        for block in self.phrase:
            x = block(x, mask)
        x = self.phrase_norm(x)
        counts = jnp.maximum(tokens.sum(axis=1, keepdims=True), 1)
        return (jnp.where(tokens[..., None], x, 0.0).sum(axis=1) / counts).reshape(b, n_tiles, self.dim)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        mask, centres = batch["mask"], batch["centres"]
        x = self.phrases(batch["words"], batch["neighbours"])
        x = x + sinusoid_2d(centres, self.dim, *self.wavelengths_um)
        distance = jnp.linalg.norm(centres[:, :, None, :] - centres[:, None, :, :], axis=-1)  # [B, L, L] µm
        near = (distance <= self.window_um) | ~batch["local"][:, None, None]
        pair = (near & mask[:, None, :])[:, None]  # [B, 1, L, L]
        for block in self.sentence:
            x = block(x, pair)
        out, _ = self.head(self.sentence_norm(x), mask)
        return out


class TileTransformer(nnx.Module):
    """Tile embeddings -> transformer with global attention and no positions -> pooled outputs `[B, n_out]`."""

    def __init__(self, in_dim: int, n_out: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(in_dim, cfg.dim, rngs=rngs)
        self.blocks = _blocks(cfg.layers, cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, rngs)
        self.norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = GatedABMIL(cfg.dim, n_out, hidden=cfg.dim, attn_dim=max(cfg.dim // 2, 1), dropout=cfg.dropout,
                               rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        x, mask = self.proj(batch["features"]), batch["mask"]
        for block in self.blocks:
            x = block(x, mask[:, None, None, :])
        out, _ = self.head(self.norm(x), mask)
        return out


class ABMILRisk(nnx.Module):
    """Gated-attention ABMIL (`xmag_jax.eval.mil.GatedABMIL`) on tile embeddings -> outputs `[B, n_out]`."""

    def __init__(self, in_dim: int, n_out: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.mil = GatedABMIL(in_dim, n_out, hidden=cfg.hidden, attn_dim=cfg.attn_dim, dropout=cfg.dropout, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        out, _ = self.mil(batch["features"], batch["mask"])
        return out


NEURAL = ("spatial", "abmil", "transformer_no_pos")


def build(name: str, word_dim: int, n_words: int, feature_dim: int, n_out: int, config: ml_collections.ConfigDict,
          seed: int) -> nnx.Module:
    """A fresh model by name (`NEURAL`), sized by `config.model` / `config.abmil` / `config.transformer_no_pos`."""
    rngs = nnx.Rngs(int(np.uint32(seed)))
    if name == "spatial":
        return SpatialRisk(word_dim, n_words, n_out, config.model, rngs=rngs)
    if name == "abmil":
        return ABMILRisk(feature_dim, n_out, config.abmil, rngs=rngs)
    if name == "transformer_no_pos":
        return TileTransformer(feature_dim, n_out, config.transformer_no_pos, rngs=rngs)
    raise ValueError(f"unknown model {name!r}; expected one of {NEURAL}")
