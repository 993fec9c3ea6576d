"""Optimizer: AdamW on a linear-warmup + cosine learning-rate schedule, after global-norm clipping.

Weight decay applies to matrices only: biases, norm scales, layer-scale gammas and the position/class/
register tokens (timm's `no_weight_decay`) are not decayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token"})


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """0 -> `optim.lr` linearly over `optim.warmup_steps`, then cosine to `lr * optim.min_lr_ratio` at total_steps."""
    lr = float(optim_cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=int(optim_cfg.warmup_steps),
        decay_steps=int(total_steps), end_value=lr * float(optim_cfg.min_lr_ratio))


def ema_decay_schedule(optim_cfg) -> optax.Schedule:
    """EMA decay for the update at (0-based) step n: `optim.ema_decay`, or with `optim.ema_warmup`
    min(ema_decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage `num_updates`), so the average
    forgets the random init within a few hundred updates instead of keeping ema_decay ** total_steps of it."""
    decay = float(optim_cfg.ema_decay)
    if not optim_cfg.get("ema_warmup", False):  # absent in configs saved before the key existed: no warmup then
        return lambda step: jnp.asarray(decay, jnp.float32)
    return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def _decay_mask(params: nnx.State):
    def decays(path, x) -> bool:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return x.ndim >= 2 and not (names & NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """`clip_by_global_norm(optim.clip_norm)` then AdamW(b1, b2, weight_decay) on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.clip_norm)),
        optax.adamw(learning_rate_schedule(optim_cfg, total_steps), b1=float(optim_cfg.b1),
                    b2=float(optim_cfg.b2), weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask),
    )
