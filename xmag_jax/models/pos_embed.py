"""Position-embedding resampling identical to timm's `resample_abs_pos_embed`.

timm calls `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`. PyTorch's antialiased
path is separable: per axis, output index i gathers inputs around `center = scale * (i + 0.5)` with the
Keys cubic kernel (a = -0.5) stretched by `scale` when downsampling, and renormalises the weights to sum
to one at the borders. We build that `[out, in]` matrix per axis in numpy and apply it with einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` float32 weights of PyTorch's antialiased bicubic resize along one axis."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        w = _cubic((j - center + 0.5) * invscale)
        total = w.sum()
        weights[i, xmin:xmax] = w / total if total != 0.0 else w
    return weights.astype(np.float32)


def resample_pos_embed(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Resample patch position embeddings `[1, gh*gw, D]` from grid `old_grid` to `new_grid` (tokens).

    Computed in float32 like timm, returned in the input dtype.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    (oh, ow), (nh, nw) = old_grid, new_grid
    grid = pos.astype(jnp.float32).reshape(pos.shape[0], oh, ow, pos.shape[-1])
    mh = jnp.asarray(bicubic_aa_matrix(oh, nh))
    mw = jnp.asarray(bicubic_aa_matrix(ow, nw))
    out = jnp.einsum("yh,xw,bhwd->byxd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(pos.shape[0], nh * nw, pos.shape[-1]).astype(pos.dtype)
