"""Padded batches of slides for the survival models (shapes in `xmag_jax.survival.model`).

Slides are padded to a power-of-two tile count (`xmag_jax.eval.mil.pad_bags`) and batches to a fixed number of
slides (`valid [B]` False for padding), so `jit` compiles once per tile-count bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xmag_jax.eval.mil import pad_bags
from xmag_jax.survival.slides import Slide


def _take(slide: Slide, max_tiles: int | None, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept and the neighbour table re-indexed to them (-1: no tile or not kept).

    All rows, or the `max_tiles` tiles nearest (in µm) to a random tile: a contiguous crop, so that the kept
    tiles keep their neighbourhoods (a random subset would break them up).
    """
    n = slide.n_tiles
    if not max_tiles or n <= max_tiles:
        keep = np.arange(n)
    else:
        centre = slide.centres_um[rng.integers(n)]
        keep = np.sort(np.argsort(np.linalg.norm(slide.centres_um - centre, axis=1), kind="stable")[:max_tiles])
    remap = np.full(n + 1, -1, np.int64)  # index n: the "no neighbour" -1 wraps here
    remap[keep] = np.arange(len(keep))
    return keep, remap[slide.neighbours[keep]]


def make_batch(slides: Sequence[Slide], time: np.ndarray, event: np.ndarray, *, batch_size: int,
               global_attention_max_tiles: int, max_tiles: int | None = None,
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """`slides` (at most `batch_size`) with their outcomes (`time` months, `event` 0/1) as one padded batch."""
    picked = [_take(s, max_tiles, rng) for s in slides]
    features, mask = pad_bags([s.features[k] for s, (k, _) in zip(slides, picked)])
    b, length = batch_size, features.shape[1]
    word_shape = slides[0].words.shape[1:]
    out = {
        "features": np.zeros((b, length, features.shape[2]), np.float32),
        "words": np.zeros((b, length, *word_shape), np.float32),
        "neighbours": np.full((b, length, slides[0].neighbours.shape[1]), -1, np.int32),
        "centres": np.zeros((b, length, 2), np.float32),
        "mask": np.zeros((b, length), bool),
        "local": np.zeros((b,), bool),
        "time": np.ones((b,), np.float32),
        "event": np.zeros((b,), np.int32),
        "valid": np.zeros((b,), bool),
    }
    out["features"][: len(slides)] = features
    out["mask"][: len(slides)] = mask
    out["mask"][len(slides):, 0] = True  # padding slides get one zero tile: no all-masked softmax (NaN gradients)
    for i, (slide, (keep, neighbours)) in enumerate(zip(slides, picked)):
        n = len(keep)
        out["words"][i, :n] = slide.words[keep]
        out["neighbours"][i, :n] = neighbours
        centres = slide.centres_um[keep]
        out["centres"][i, :n] = centres - centres.mean(axis=0)
        out["local"][i] = slide.n_tiles > global_attention_max_tiles  # the whole slide's: crops train as it is used
    out["time"][: len(slides)] = time
    out["event"][: len(slides)] = event
    out["valid"][: len(slides)] = True
    return out
