"""The `tokens` dataset of a feature h5: each tile's patch-token grid average-pooled to S x S "words".

Contract (written by `embed --tokens S` through `add_tokens`, read by `xmag_jax.survival.slides`; the rest
of the h5 is TRIDENT's layout, `xmag_jax.embed.write_h5`):
  * dataset `tokens`, shape `[N, S, S, D]`, float16, row i belongs to `coords[i]` / `features[i]`;
  * its attrs: `token_grid` (S), `patch_grid` (G, the encoder's token grid per tile side), `um_per_word`
    (µm of tissue one word spans: patch_size px x mpp µm/px / S).
"""

from __future__ import annotations

import h5py
import numpy as np

DATASET = "tokens"
DTYPE = np.float16


def pool_tokens(patches: np.ndarray, s: int) -> np.ndarray:
    """Adaptive average pooling of patch tokens `[B, G, G, D]` to `[B, S, S, D]` float32.

    Output cell i spans input rows floor(i G / S) .. ceil((i + 1) G / S) (as torch's AdaptiveAvgPool2d), so
    G need not be a multiple of S; with G = k S it is a plain k x k mean.
    """
    patches = np.asarray(patches, np.float32)
    if patches.ndim != 4 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patch tokens have shape {patches.shape}, expected [B, G, G, D]")
    g = patches.shape[1]
    if not 1 <= s <= g:
        raise ValueError(f"token grid S={s} must be between 1 and the patch grid G={g}")
    edges = [(i * g // s, -(-(i + 1) * g // s)) for i in range(s)]
    rows = np.stack([patches[:, a:b].mean(axis=1) for a, b in edges], axis=1)  # [B, S, G, D]
    return np.stack([rows[:, :, a:b].mean(axis=2) for a, b in edges], axis=2)


def add_tokens(f: h5py.File, tokens: np.ndarray, *, patch_grid: int, patch_px: int, mpp: float) -> None:
    """Writes pooled `tokens [N, S, S, D]` into an open feature h5 as float16 with the contract's attrs.

    `patch_px` is the tile side in px at `mpp` µm/px (the h5's `patch_size` and `mpp` attrs).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
        raise ValueError(f"tokens have shape {tokens.shape}, expected [N, S, S, D]")
    s = tokens.shape[1]
    d = f.create_dataset(DATASET, data=tokens.astype(DTYPE))
    d.attrs["token_grid"] = s
    d.attrs["patch_grid"] = patch_grid
    d.attrs["um_per_word"] = patch_px * mpp / s
