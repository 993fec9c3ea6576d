"""Position-embedding resampling identical to timm's `resample_abs_pos_embed`, and to the official DINOv2 code's.

timm calls `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`. PyTorch's antialiased
path is separable: per axis, output index i gathers inputs around `center = scale * (i + 0.5)` with the
Keys cubic kernel (a = -0.5) stretched by `scale` when downsampling, and renormalises the weights to sum
to one at the borders. We build that `[out, in]` matrix per axis in numpy and apply it with einsum.

The official DINOv2 code (`DinoVisionTransformer.interpolate_pos_encoding`) instead calls
`F.interpolate(mode="bicubic", scale_factor=(g + 0.1) / s)` for an `s x s` table and a `g x g` token grid: no
antialias, and the source coordinate follows the scale factor, not the output size. `dinov2_resample_pos_embed`
reproduces that (used once, when DINOv2-released weights are imported).
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
def bicubic_scale_matrix(in_size: int, scale_factor: float) -> np.ndarray:
    """`[floor(in_size * scale_factor), in_size]` float32 weights of PyTorch's plain bicubic resize along one axis
    (`F.interpolate(mode="bicubic", scale_factor=..., align_corners=False)`, no antialias): output i samples
    `x = (i + 0.5) / scale_factor - 0.5` (in float32, as PyTorch) with the cubic kernel a = -0.75 on inputs
    floor(x) - 1 .. floor(x) + 2, indices clamped to the border."""
    out_size = int(np.floor(in_size * scale_factor))
    weights = np.zeros((out_size, in_size), np.float64)
    ratio = np.float32(1.0 / scale_factor)  # PyTorch computes the coordinates in float32 for float32 input
    for i in range(out_size):
        x = ratio * np.float32(i + 0.5) - np.float32(0.5)
        base = min(int(np.floor(x)), in_size - 1)
        t = np.float32(min(max(x - np.float32(base), np.float32(0.0)), np.float32(1.0)))
        taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t], np.float32).astype(np.float64), a=-0.75)
        for offset, w in zip(range(-1, 3), taps):
            weights[i, min(max(base + offset, 0), in_size - 1)] += w
    return weights.astype(np.float32)


def dinov2_resample_pos_embed(pos: np.ndarray, new_grid: int) -> np.ndarray:
    """Patch position table `[1, s*s, D]` -> `[1, g*g, D]` (g = `new_grid` tokens per side) as the official DINOv2
    code computes it on every forward at g tokens per side: scale factor `(g + 0.1) / s`, plain bicubic, float32."""
    size = int(round(np.sqrt(pos.shape[1])))
    if size * size != pos.shape[1]:
        raise ValueError(f"position table of {pos.shape[1]} patches is not a square grid")
    m = bicubic_scale_matrix(size, (new_grid + 0.1) / size)
    if m.shape[0] != new_grid:
        raise ValueError(f"DINOv2 resampling of a {size}x{size} table gives {m.shape[0]}, not {new_grid}, per side")
    grid = np.asarray(pos, np.float32).reshape(pos.shape[0], size, size, pos.shape[-1])
    out = np.einsum("yh,xw,bhwd->byxd", m.astype(np.float64), m.astype(np.float64), grid.astype(np.float64))
    return out.reshape(pos.shape[0], new_grid * new_grid, pos.shape[-1]).astype(np.float32)


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
