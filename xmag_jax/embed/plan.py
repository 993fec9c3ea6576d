"""The tiling plan of a slide for `xmag_jax.embed` and `data_prep.tile_bags` (no JAX): which level-0 fields
of `patch_px · mpp / level0_mpp` px hold enough tissue (`xmag_jax.wsi.tissue`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from xmag_jax import geometry
from xmag_jax.wsi import inputs, slide_reader, tissue


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles of `patch_px` px at `mpp` µm/px; fields kept with tissue fraction >= `min_tissue`."""

    mpp: float
    patch_px: int = geometry.TILE_PX
    min_tissue: float = 0.25


@dataclasses.dataclass
class SlidePlan:
    spec: inputs.SlideSpec
    coords: np.ndarray  # int64 [N, 2] level-0 top-left (x, y)
    field_level0: int  # level-0 px side of one tile's field
    level0_mpp: float


def plan_slide(slide: slide_reader.Slide, spec: inputs.SlideSpec, tiling: Tiling) -> SlidePlan:
    """Tissue mask and the grid of fields of `patch_px · mpp / level0_mpp` level-0 px."""
    field = int(round(tiling.patch_px * tiling.mpp / slide.mpp))
    if field < tiling.patch_px * 0.99:
        raise slide_reader.ResolutionError(
            f"{spec.path}: level 0 is {slide.mpp:g} µm/px, coarser than the requested {tiling.mpp:g} µm/px")
    _, mask, downsample = tissue.slide_mask(slide)
    grid = tissue.tile_grid(slide.dimensions, field, mask, downsample, tiling.min_tissue)
    return SlidePlan(spec, grid.coords, field, slide.mpp)
