"""Attention heatmaps: ABMIL attention of each tile painted over the slide thumbnail, as a PNG.

Scores are converted to percentiles within the slide (as CLAM does) and coloured blue (low) to red (high),
blended over the thumbnail on each tile's level-0 square. The slide is found from the `--slides` folder or
CSV, else from the feature file's `slide_path` attr; without a readable slide the tiles go on white.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings

import numpy as np
from PIL import Image
from scipy import stats

from xmag_jax import atomic
from xmag_jax.formats.feature_h5 import SlideBag
from xmag_jax.wsi import inputs, slide_reader

_JET = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]], np.float32)
_JET_AT = np.array([0, .125, .375, .625, .875, 1], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] `[N]` -> jet RGB uint8 `[N, 3]`."""
    v = np.clip(values, 0, 1)
    return (255 * np.stack([np.interp(v, _JET_AT, _JET[:, c]) for c in range(3)], -1)).astype(np.uint8)


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Rank of each score within the slide, in (0, 1]."""
    return stats.rankdata(scores) / max(len(scores), 1)


def render(coords: np.ndarray, attention: np.ndarray, patch_size_level0: float, thumbnail: np.ndarray,
           downsample: float, alpha: float = 0.5) -> Image.Image:
    """Blend the coloured attention of tiles (`coords [N, 2]` level-0 px) over `thumbnail [H, W, 3]`
    (level-0 px per thumbnail px: `downsample`)."""
    canvas = thumbnail.astype(np.float32).copy()
    h, w = canvas.shape[:2]
    colours = colormap(percentiles(attention)).astype(np.float32)
    side = patch_size_level0 / downsample
    for (x, y), colour in zip(coords / downsample, colours):
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = min(int(round(x + side)), w), min(int(round(y + side)), h)
        canvas[y0:y1, x0:x1] = (1 - alpha) * canvas[y0:y1, x0:x1] + alpha * colour
    return Image.fromarray(canvas.astype(np.uint8))


@functools.cache
def _slides_in(slides: str) -> dict[str, inputs.SlideSpec]:
    return {s.slide_id: s for s in inputs.list_slides(slides)}


def thumbnail_of(bag: SlideBag, slides: str | None, max_side: int) -> tuple[np.ndarray, float]:
    """(RGB uint8 thumbnail, level-0 px per thumbnail px); white canvas over the tiles' extent if no slide."""
    path, mpp = bag.attrs.get("slide_path"), bag.attrs.get("level0_mpp")
    if slides:
        spec = _slides_in(slides).get(bag.slide_id)
        path, mpp = (spec.path, spec.mpp or mpp) if spec else (None, mpp)
    if path and os.path.isfile(path):
        try:
            with slide_reader.open_slide(path, mpp) as slide:
                target = slide.mpp * max(slide.dimensions) / max_side
                return slide_reader.read_level_image(slide, target)
        except slide_reader.SlideError as e:
            warnings.warn(f"{bag.path}: no thumbnail ({e}); drawing on white", stacklevel=2)
    extent = bag.coords.max(axis=0) + float(bag.attrs.get("patch_size_level0", 1)) if len(bag.coords) else np.ones(2)
    downsample = max(float(extent.max()) / max_side, 1e-9)
    shape = np.maximum(np.ceil(extent[::-1] / downsample).astype(int), 1)
    return np.full((*shape, 3), 255, np.uint8), downsample


def write_heatmap(bag: SlideBag, attention: np.ndarray, out_dir: str | os.PathLike, *, slides: str | None = None,
                  max_side: int = 1024) -> pathlib.Path:
    """`out_dir/{slide_id}_attention.png` (written to a temp name and renamed). Returns its path."""
    if len(attention) != len(bag.coords):
        raise ValueError(f"{bag.path}: {len(attention)} attention scores for {len(bag.coords)} tiles")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumb, downsample = thumbnail_of(bag, slides, max_side)
    image = render(bag.coords, attention, float(bag.attrs.get("patch_size_level0", 1)), thumb, downsample)
    path = out_dir / f"{bag.slide_id}_attention.png"
    with atomic.target(path) as tmp:
        image.save(tmp, format="PNG")
    return path
