"""Tissue mask (CLAM-style) and the grid of square tiles with their tissue fraction.

Mask: thumbnail → HSV saturation → median blur (7 px) → Otsu threshold → morphological close → drop
components smaller than `min_area_um2`, fill holes smaller than `min_hole_um2` (larger holes stay background).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from xmag_jax import atomic
from xmag_jax.wsi import slide_reader

THUMBNAIL_MPP = 8.0


@dataclasses.dataclass(frozen=True)
class MaskParams:
    """CLAM-like defaults, areas in µm² so they mean the same at every scan resolution."""

    median_px: int = 7
    close_px: int = 5
    min_saturation: int = 15
    min_area_um2: float = 0.05e6
    min_hole_um2: float = 0.02e6


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 `values`: the level maximising the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean_cum = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_cum[-1] * weight0 - mean_cum * weight0[-1]) ** 2 / (weight0 * weight1)
    return int(np.argmax(np.nan_to_num(between[:-1], nan=-1.0)))


def tissue_mask(thumb: np.ndarray, thumb_mpp: float, params: MaskParams = MaskParams()) -> np.ndarray:
    """Boolean [H, W] tissue mask of an RGB uint8 thumbnail [H, W, 3] at `thumb_mpp` µm/px."""
    saturation = np.asarray(Image.fromarray(thumb).convert("HSV"))[..., 1]
    saturation = ndimage.median_filter(saturation, size=params.median_px)
    threshold = max(otsu_threshold(saturation), params.min_saturation)
    mask = saturation > threshold
    structure = np.ones((params.close_px, params.close_px), bool)
    mask = ndimage.binary_closing(np.pad(mask, params.close_px), structure)[
        params.close_px:-params.close_px, params.close_px:-params.close_px]
    px_area = thumb_mpp ** 2
    labels, n = ndimage.label(mask)
    if n:
        areas = ndimage.sum_labels(np.ones_like(mask), labels, index=np.arange(1, n + 1)) * px_area
        mask = np.isin(labels, 1 + np.flatnonzero(areas >= params.min_area_um2))
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n_holes:
        areas = ndimage.sum_labels(np.ones_like(mask), holes, index=np.arange(1, n_holes + 1)) * px_area
        mask |= np.isin(holes, 1 + np.flatnonzero(areas < params.min_hole_um2))
    return mask


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Square fields of `field_level0` level-0 px. coords: int64 [N, 2] level-0 top-left (x, y);
    tissue_fraction: float32 [N] in [0, 1]."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    field_level0: int


def tissue_fractions(mask: np.ndarray, mask_downsample: float, coords: np.ndarray, field_level0: float) -> np.ndarray:
    """Fraction of each level-0 field [x, x + field) x [y, y + field) covered by `mask` (mask px = level-0 / ds)."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    lo = np.rint(coords / mask_downsample).astype(np.int64)
    hi = np.maximum(np.rint((coords + field_level0) / mask_downsample).astype(np.int64), lo + 1)
    area = (hi[:, 0] - lo[:, 0]) * (hi[:, 1] - lo[:, 1])
    lo, hi = np.clip(lo, 0, [w, h]), np.clip(hi, 0, [w, h])
    inside = (integral[hi[:, 1], hi[:, 0]] - integral[lo[:, 1], hi[:, 0]]
              - integral[hi[:, 1], lo[:, 0]] + integral[lo[:, 1], lo[:, 0]])
    return (inside / area).astype(np.float32)


def tile_grid(dimensions: tuple[int, int], field_level0: int, mask: np.ndarray, mask_downsample: float,
              min_tissue_fraction: float) -> TileGrid:
    """Non-overlapping fields covering the slide from (0, 0), kept when tissue fraction ≥ `min_tissue_fraction`."""
    width, height = dimensions
    xs = np.arange(0, width - field_level0 + 1, field_level0)
    ys = np.arange(0, height - field_level0 + 1, field_level0)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    fractions = tissue_fractions(mask, mask_downsample, coords, field_level0)
    keep = fractions >= min_tissue_fraction
    return TileGrid(coords[keep], fractions[keep], field_level0)


def slide_mask(slide: slide_reader.Slide, params: MaskParams = MaskParams(),
               thumb_mpp: float = THUMBNAIL_MPP) -> tuple[np.ndarray, np.ndarray, float]:
    """(thumbnail RGB uint8 [H, W, 3], tissue mask bool [H, W], level-0 px per thumbnail px)."""
    thumb, downsample = slide_reader.read_level_image(slide, thumb_mpp)
    return thumb, tissue_mask(thumb, downsample * slide.mpp, params), downsample


def write_overlay(path: str, thumb: np.ndarray, mask: np.ndarray, grid: TileGrid, downsample: float) -> None:
    """PNG: thumbnail, tissue mask tinted green, kept tiles outlined in blue; written atomically."""
    image = thumb.astype(np.float32)
    image[mask] = 0.65 * image[mask] + 0.35 * np.array([0, 200, 0], np.float32)
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = grid.field_level0 / downsample
    for x, y in grid.coords / downsample:
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(0, 0, 255))
    with atomic.target(path) as tmp:
        canvas.save(tmp, format="PNG")
