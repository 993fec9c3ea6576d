"""Open a whole-slide image, find its level-0 pixel size (µm/px), read square fields at a target µm/px.

OpenSlide first, tiffslide where OpenSlide cannot open the file (e.g. stripped or OME TIFFs). The pixel size
comes from, in order: the caller (CSV `mpp` column), `openslide.mpp-x/y` (vendor metadata or TIFF resolution
tags), Aperio `MPP`, TIFF `XResolution`/`YResolution` with `ResolutionUnit`. Never from "magnification".

Reads pick the pyramid level with the largest downsample ≤ the one needed and resize the rest of the way
with an area filter (box; Lanczos when a read must be upsampled within tolerance).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import openslide
import tiffslide
from PIL import Image

from xmag_jax.errors import UserError

PLAUSIBLE_MPP = (0.02, 20.0)
LEVEL_SLACK = 1.01
_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0}


class SlideError(UserError):
    """A slide that cannot be used; the class name is the failure kind reported in failures.jsonl."""


class NotASlideError(SlideError):
    """Neither OpenSlide nor tiffslide can open the file (not a slide, truncated header, unknown format)."""


class MissingMppError(SlideError):
    """No trustworthy level-0 pixel size in the file."""


class RegionReadError(SlideError):
    """A region could not be decoded (truncated or corrupt tile data)."""


class ResolutionError(SlideError):
    """The slide is too coarse for the requested µm/px, or its pixels are not square."""


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def mpp_from_properties(props: Mapping[str, Any]) -> tuple[tuple[float, float], str] | None:
    """(µm/px x, y) and where it came from, or None. `props`: OpenSlide or tiffslide properties."""
    for prefix in ("openslide", "tiffslide"):
        x, y = _float(props.get(f"{prefix}.mpp-x")), _float(props.get(f"{prefix}.mpp-y"))
        if x:
            return (x, y or x), f"{prefix}.mpp-x/y"
    if aperio := _float(props.get("aperio.MPP")):
        return (aperio, aperio), "Aperio MPP"
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    x, y = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if unit in _UNIT_UM and x:
        return (_UNIT_UM[unit] / x, _UNIT_UM[unit] / (y or x)), f"TIFF resolution tags ({unit})"
    return None


@dataclasses.dataclass
class Slide:
    """An open slide. `mpp`: level-0 µm/px (square pixels); `backend`: 'openslide' or 'tiffslide'."""

    path: str
    slide_id: str
    handle: Any
    mpp: float
    mpp_source: str
    backend: str

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in px."""
        return tuple(self.handle.dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self.handle.level_downsamples)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id: the file name without its extension."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _open_handle(path: str) -> tuple[Any, str]:
    if not os.path.isfile(path):
        raise NotASlideError(f"{path}: no such file")
    try:
        return openslide.OpenSlide(path), "openslide"
    except openslide.OpenSlideUnsupportedFormatError as os_err:
        try:
            handle = tiffslide.TiffSlide(path)
            try:  # tiffslide parses lazily: a TIFF header over garbage fails only when it is read
                handle.properties, handle.level_dimensions  # noqa: B018
            except Exception:
                handle.close()
                raise
            return handle, "tiffslide"
        except Exception as ts_err:  # tiffslide raises tifffile/zarr/value/index errors on non-slides
            raise NotASlideError(f"{path}: not a slide OpenSlide or tiffslide can open "
                                 f"(OpenSlide: {os_err}; tiffslide: {type(ts_err).__name__}: {ts_err})") from None
    except openslide.OpenSlideError as err:
        raise NotASlideError(f"{path}: OpenSlide cannot open it (truncated or corrupt?): {err}") from None


def open_slide(path: str | os.PathLike, mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open `path`; `mpp` (level-0 µm/px) overrides the file's metadata. Raises a SlideError subclass."""
    path = os.fspath(path)
    handle, backend = _open_handle(path)
    try:
        if mpp is not None:
            found, source = ((float(mpp), float(mpp)), "given")
        elif (hit := mpp_from_properties(handle.properties)) is not None:
            found, source = hit
        else:
            raise MissingMppError(f"{path}: no pixel size (µm/px) in the file (no openslide.mpp-x, Aperio MPP or "
                                  f"TIFF resolution unit); pass the level-0 µm/px in the CSV manifest's `mpp` column")
        mpp_x, mpp_y = found
        if not all(PLAUSIBLE_MPP[0] <= m <= PLAUSIBLE_MPP[1] for m in (mpp_x, mpp_y)):
            raise MissingMppError(f"{path}: pixel size {mpp_x:g} x {mpp_y:g} µm/px from {source} is not a "
                                  f"microscope's (expected {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]}); pass the level-0 "
                                  f"µm/px in the CSV manifest's `mpp` column")
        if abs(mpp_x - mpp_y) > 0.01 * mpp_x:
            raise ResolutionError(f"{path}: non-square pixels ({mpp_x:g} x {mpp_y:g} µm/px) are not supported")
    except SlideError:
        handle.close()
        raise
    return Slide(path, slide_id or slide_id_of(path), handle, mpp_x, source, backend)


def best_level(downsamples: Sequence[float], needed: float) -> int:
    """Index of the level with the largest downsample ≤ `needed` (1 % slack for rounded downsamples)."""
    fitting = [i for i, d in enumerate(downsamples) if d <= needed * LEVEL_SLACK]
    return max(fitting, key=lambda i: downsamples[i]) if fitting else 0


def _read(slide: Slide, x0: int, y0: int, level: int, size: tuple[int, int]) -> Image.Image:
    try:
        return slide.handle.read_region((int(x0), int(y0)), level, size)
    except Exception as err:  # OpenSlideError, tifffile/zarr decode errors, OSError on truncated files
        raise RegionReadError(f"{slide.path}: cannot read {size[0]}x{size[1]} px at level {level} "
                              f"from level-0 ({x0}, {y0}): {type(err).__name__}: {err}") from None


def _opaque(region: Image.Image) -> Image.Image:
    """RGB, or RGBA with every pixel opaque: transparent pixels (outside the scan) become white glass."""
    if region.mode == "RGBA" and region.getchannel("A").getextrema()[0] < 255:
        return Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
    return region if region.mode in ("RGB", "RGBA") else region.convert("RGB")


def _to_rgb(region: Image.Image) -> Image.Image:
    return _opaque(region).convert("RGB")


def _resize(region: Image.Image, span: float, out_px: int, resample: str) -> Image.Image:
    """Square `region`'s top-left span x span px -> out_px x out_px (box/area when shrinking, else Lanczos)."""
    factor = span / out_px
    if abs(factor - round(factor)) < 1e-6 and region.size == (round(span),) * 2:
        return region if round(factor) == 1 else region.reduce(round(factor))
    filt = Image.BOX if (resample == "area" and factor > 1) else Image.LANCZOS
    return region.resize((out_px, out_px), filt, box=(0, 0, span, span))


def read_field_image(slide: Slide, x0: int, y0: int, size_level0: float, out_px: int, resample: str = "area"
                     ) -> Image.Image:
    """Like `read_field` but a PIL image, RGB or opaque RGBA (saves a copy when encoding as JPEG)."""
    level = best_level(slide.level_downsamples, size_level0 / out_px)
    span = size_level0 / slide.level_downsamples[level]
    read_px = max(int(math.ceil(span - 1e-6)), 1)
    region = _read(slide, x0, y0, level, (read_px, read_px))
    if resample == "lanczos" and read_px != out_px:
        return _opaque(region).resize((out_px, out_px), Image.LANCZOS, box=(0, 0, span, span))
    return _opaque(_resize(region, span, out_px, resample))


def read_field(slide: Slide, x0: int, y0: int, size_level0: float, out_px: int, resample: str = "area") -> np.ndarray:
    """The square level-0 field [x0, x0 + size_level0) x [y0, ...) as RGB uint8 [out_px, out_px, 3].

    Reads the pyramid level with the largest downsample ≤ size_level0 / out_px and resizes the rest of the
    way: `resample` 'area' (box average when shrinking, Lanczos when enlarging) or 'lanczos'.
    """
    return np.asarray(read_field_image(slide, x0, y0, size_level0, out_px, resample).convert("RGB"))


THUMB_READ_PX = 2048  # side of the level region read at a time for a thumbnail, px


def read_level_image(slide: Slide, target_mpp: float) -> tuple[np.ndarray, float]:
    """The whole slide at about `target_mpp` µm/px: (RGB uint8 [H, W, 3], its downsample from level 0).

    Reads the best pyramid level in blocks of at most THUMB_READ_PX x THUMB_READ_PX level px, each box-filtered
    into its part of the thumbnail, so peak memory is the thumbnail plus one block whatever the slide's size
    (a slide without a pyramid would otherwise be read whole: ~7 bytes per level-0 px).
    """
    width, height = slide.dimensions
    ds = target_mpp / slide.mpp
    level = best_level(slide.level_downsamples, ds)
    lw, lh = slide.handle.level_dimensions[level]
    level_ds = slide.level_downsamples[level]
    out_w, out_h = max(int(round(width / ds)), 1), max(int(round(height / ds)), 1)
    sx, sy = lw / out_w, lh / out_h  # level px per thumbnail px
    block_w, block_h = max(int(THUMB_READ_PX // sx), 1), max(int(THUMB_READ_PX // sy), 1)  # thumbnail px
    thumb = np.empty((out_h, out_w, 3), np.uint8)
    for ty in range(0, out_h, block_h):
        for tx in range(0, out_w, block_w):
            tw, th = min(block_w, out_w - tx), min(block_h, out_h - ty)
            x0, y0 = int(tx * sx), int(ty * sy)
            x1, y1 = min(int(math.ceil((tx + tw) * sx)), lw), min(int(math.ceil((ty + th) * sy)), lh)
            region = _to_rgb(_read(slide, round(x0 * level_ds), round(y0 * level_ds), level, (x1 - x0, y1 - y0)))
            if region.size != (tw, th):
                box = (tx * sx - x0, ty * sy - y0, (tx + tw) * sx - x0, (ty + th) * sy - y0)
                region = region.resize((tw, th), Image.BOX, box=box)
            thumb[ty:ty + th, tx:tx + tw] = np.asarray(region)
    return thumb, width / out_w
