"""XMAG dual-level distillation losses: global representation + local spatial token mapping.

Geometry: one 5x tile (224 px at ~2.0 µm/px) covers the field of the 4x4 = 16 tiles at 20x
(row-major, tile k at row k // 4, column k % 4). The student sees the 5x tile as a G x G token grid;
the teacher sees each 20x tile as a Gt x Gt grid, so the field is a 4·Gt x 4·Gt teacher mosaic.

- global: projected student embedding ↔ mean of the 16 teacher tile embeddings.
- tile: the student's G/4 x G/4 token block k (mean), projected ↔ the teacher embedding of 20x tile k.
- token: each student token, projected ↔ the teacher mosaic average-pooled to the student grid.

All distances are computed in float32 and averaged over batch (and tiles/tokens). With V augmented views
of each pair (`data.views`), predictions and targets carry a view axis `[B, V, ...]`, each view's student
output is compared with the teacher on that same view, and the mean over (B, V) is the mean of the V
per-view losses (every view has B pairs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from xmag_jax.geometry import FIELD_SIDE, FIELD_TILES

MODES = ("dual", "global_only", "local_only")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms after applying `loss.mode`; a zero weight means the term is not computed."""

    global_cos: float
    global_smooth_l1: float
    tile: float
    token: float

    @classmethod
    def from_config(cls, loss_cfg) -> LossWeights:
        """Reads `config.loss` (global_weight, global_smooth_l1_weight, tile_weight, token_weight, mode)."""
        mode = loss_cfg.mode
        if mode not in MODES:
            raise ValueError(f"config.loss.mode: expected one of {MODES}, got {mode!r}")
        use_global = mode != "local_only"
        use_local = mode != "global_only"
        weights = cls(
            global_cos=float(loss_cfg.global_weight) if use_global else 0.0,
            global_smooth_l1=float(loss_cfg.global_smooth_l1_weight) if use_global else 0.0,
            tile=float(loss_cfg.tile_weight) if use_local else 0.0,
            token=float(loss_cfg.token_weight) if use_local else 0.0,
        )
        for name, value in dataclasses.asdict(weights).items():
            if value < 0:
                raise ValueError(f"config.loss: weight of {name!r} must be >= 0, got {value}")
        if not any(dataclasses.asdict(weights).values()):
            raise ValueError(f"config.loss: every loss term has weight 0 in mode {mode!r}")
        return weights

    @property
    def use_global(self) -> bool:
        return self.global_cos > 0 or self.global_smooth_l1 > 0

    @property
    def term_names(self) -> tuple[str, ...]:
        """Keys of `xmag_losses(...)` under these weights, 'total' last."""
        names = [("global", self.global_cos), ("global_smooth_l1", self.global_smooth_l1),
                 ("tile", self.tile), ("token", self.token)]
        return tuple(n for n, w in names if w > 0) + ("total",)


def cosine_distance(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of `1 - cos(pred, target)` over all leading axes; inputs `[..., D]`, computed in float32."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    return optax.losses.cosine_distance(pred, target, epsilon=1e-12).mean()


def smooth_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Smooth-L1 (Huber, beta = 1) averaged over all elements, in float32."""
    return optax.losses.huber_loss(pred.astype(jnp.float32), target.astype(jnp.float32), delta=1.0).mean()


def student_tile_blocks(patches: jax.Array) -> jax.Array:
    """`[B, G, G, D]` student tokens -> `[B, 16, D]`: mean of each (G/4 x G/4) block, row-major."""
    b, gh, gw, d = patches.shape
    if gh % FIELD_SIDE or gw % FIELD_SIDE:
        raise ValueError(f"student token grid {gh}x{gw} does not divide into {FIELD_SIDE}x{FIELD_SIDE} blocks")
    x = patches.reshape(b, FIELD_SIDE, gh // FIELD_SIDE, FIELD_SIDE, gw // FIELD_SIDE, d)
    return x.mean(axis=(2, 4)).reshape(b, FIELD_TILES, d)


def teacher_mosaic(tile_patches: jax.Array) -> jax.Array:
    """`[B, 16, Gt, Gt, D]` patch grids of the row-major 4x4 tiles -> `[B, 4·Gt, 4·Gt, D]` field mosaic."""
    b, k, gh, gw, d = tile_patches.shape
    if k != FIELD_TILES:
        raise ValueError(f"expected {FIELD_TILES} teacher tiles per field, got {k}")
    x = tile_patches.reshape(b, FIELD_SIDE, FIELD_SIDE, gh, gw, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, FIELD_SIDE * gh, FIELD_SIDE * gw, d)


def pool_to_grid(grid: jax.Array, out_side: int) -> jax.Array:
    """Average-pool `[B, M, M, D]` to `[B, out_side, out_side, D]` (M must be a multiple of out_side)."""
    b, mh, mw, d = grid.shape
    if mh % out_side or mw % out_side:
        raise ValueError(f"teacher mosaic {mh}x{mw} does not pool evenly to the student grid {out_side}x{out_side}")
    x = grid.reshape(b, out_side, mh // out_side, out_side, mw // out_side, d)
    return x.mean(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class Targets:
    """Teacher targets of a batch of fields (float32, no gradient), leading axes `L` (`B, V` in the step).

    global_: `[*L, Et]` mean of the 16 tile embeddings; tiles: `[*L, 16, Et]`; tokens: `[*L, G, G, Dt]`.
    """

    global_: jax.Array
    tiles: jax.Array
    tokens: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Projected student outputs: global_ `[*L, Et]`, tiles `[*L, 16, Et]`, tokens `[*L, G, G, Dt]` (None if
    unused), leading axes `L` as the targets'."""

    global_: jax.Array | None
    tiles: jax.Array | None
    tokens: jax.Array | None


def teacher_targets(tile_embeddings: jax.Array, tile_patches: jax.Array | None, student_grid: int) -> Targets:
    """Targets from the teacher's outputs on the 16 tiles of each field.

    tile_embeddings: `[*L, 16, Et]` (the teacher's own embedding definition); tile_patches:
    `[*L, 16, Gt, Gt, Dt]` or None when the token-level term is off; student_grid: G, the student's tokens
    per side. `L` are any leading axes (fields `[B]`, or fields and views `[B, V]`).
    """
    emb = jax.lax.stop_gradient(tile_embeddings.astype(jnp.float32))
    tokens = None
    if tile_patches is not None:
        lead = tile_patches.shape[:-4]
        fields = jax.lax.stop_gradient(tile_patches).astype(jnp.float32).reshape(-1, *tile_patches.shape[-4:])
        tokens = pool_to_grid(teacher_mosaic(fields), student_grid)
        tokens = tokens.reshape(*lead, *tokens.shape[1:])
    return Targets(global_=emb.mean(axis=-2), tiles=emb, tokens=tokens)


def target_means(targets: Targets) -> dict[str, jax.Array]:
    """Batch means of the teacher targets: `embedding` `[Et]` over fields (and views) and tiles, `token`
    `[Dt]` over fields (and views) and token positions (absent when the token term is off)."""
    means = {"embedding": targets.tiles.reshape(-1, targets.tiles.shape[-1]).mean(axis=0)}
    if targets.tokens is not None:
        means["token"] = targets.tokens.reshape(-1, targets.tokens.shape[-1]).mean(axis=0)
    return means


def center_targets(targets: Targets, center: dict[str, jax.Array]) -> Targets:
    """Targets minus a running mean (`target_means` keys). A trained teacher's embeddings share a large
    common component (mean pairwise cosine ~0.7 on the demo's stand-in teacher); under a cosine loss a
    projector that outputs it scores well while the student learns nothing, and centering (as DINO does
    for its teacher) leaves only what varies from tile to tile as the target."""
    tokens = targets.tokens
    if tokens is not None:
        tokens = tokens - center["token"]
    return Targets(global_=targets.global_ - center["embedding"], tiles=targets.tiles - center["embedding"],
                   tokens=tokens)


def xmag_losses(pred: Predictions, target: Targets, weights: LossWeights) -> dict[str, jax.Array]:
    """Active loss terms plus their weighted sum under 'total' (scalars, float32)."""
    terms: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    if weights.global_cos > 0:
        terms["global"] = cosine_distance(pred.global_, target.global_)
        total += weights.global_cos * terms["global"]
    if weights.global_smooth_l1 > 0:
        terms["global_smooth_l1"] = smooth_l1(pred.global_, target.global_)
        total += weights.global_smooth_l1 * terms["global_smooth_l1"]
    if weights.tile > 0:
        terms["tile"] = cosine_distance(pred.tiles, target.tiles)
        total += weights.tile * terms["tile"]
    if weights.token > 0:
        terms["token"] = cosine_distance(pred.tokens, target.tokens)
        total += weights.token * terms["token"]
    terms["total"] = total
    return terms
