"""One slide -> its tile pairs: a per-slide ArrayRecord shard + a done marker, both written atomically.

Work layout under `work_dir`: `{slide_id}.array_record` (the pairs), `{slide_id}.done.json` (written last:
the slide is complete iff it exists, its fingerprint matches the options and the slide file, and the shard
still has the size and head/tail digest the marker vouches for), `{slide_id}.failed.json` (the slide's
`xmag_jax.wsi.failures` record), overlays under `overlay_dir/{slide_id}.png`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import simplejpeg
from array_record.python import array_record_module
from PIL import Image
from tqdm import tqdm

from xmag_jax import atomic, geometry
from xmag_jax.formats import pair_records
from xmag_jax.wsi import failures, inputs, slide_reader, tissue


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """Targets in µm/px; `mpp_tolerance`: relative slack before a slide counts as too coarse for 20x;
    `allow_upsample`: tile such a slide anyway (its 20x regions upsampled); `low_mag_source`: the 5x tile read
    from the pyramid ('pyramid') or Lanczos-resized from the 20x region ('resize', XMAG's way)."""

    mpp_5x: float = geometry.MPP_5X
    mpp_20x: float = geometry.MPP_20X
    mpp_tolerance: float = 0.1
    allow_upsample: bool = False
    low_mag_source: str = "pyramid"
    min_tissue: float = 0.25
    jpeg_quality: int = 90
    resample: str = "area"
    mask: tissue.MaskParams = tissue.MaskParams()
    thumb_mpp: float = tissue.THUMBNAIL_MPP
    progress: bool = True

    def fingerprint(self, spec: inputs.SlideSpec) -> str:
        """Changes when anything that shapes this slide's pairs changes (options, slide file, coords file)."""
        return fingerprint(self, spec)


def fingerprint(config: Any, spec: inputs.SlideSpec) -> str:
    """Hash of a dataclass `config` (its `progress` field aside), the slide spec and its files' size and mtime."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in (spec.path, spec.coords) if p and os.path.exists(p)]
    return hashlib.sha256(json.dumps([fields, dataclasses.asdict(spec), stats], sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


def shard_path(work_dir: str, slide_id: str) -> str:
    return os.path.join(work_dir, f"{slide_id}.array_record")


def done_path(work_dir: str, slide_id: str) -> str:
    return os.path.join(work_dir, f"{slide_id}.done.json")


def failed_path(work_dir: str, slide_id: str) -> str:
    return os.path.join(work_dir, f"{slide_id}.failed.json")


def write_failed(work_dir: str, failure: failures.Failure) -> dict:
    """Writes the slide's failed marker (`failure.record()`, atomically); returns the record."""
    record = failure.record()
    atomic.write_json(failed_path(work_dir, failure.slide_id), record)
    return record


def read_failed(work_dir: str, spec: inputs.SlideSpec) -> failures.Failure | None:
    """The slide's failed marker, or None if there is none (or it cannot be read)."""
    try:
        with open(failed_path(work_dir, spec.slide_id)) as f:
            return failures.Failure.from_record(json.load(f))
    except (OSError, ValueError, KeyError):
        return None


def read_done(work_dir: str, spec: inputs.SlideSpec, config: PairConfig) -> dict | None:
    """The done marker of `spec` if it is complete for `config` and its shard is what it vouches for, else
    None (with a warning when the shard changed: the slide is then tiled again)."""
    try:
        with open(done_path(work_dir, spec.slide_id)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") != config.fingerprint(spec):
        return None
    shard = shard_path(work_dir, spec.slide_id)
    try:
        size, digest = os.path.getsize(shard), atomic.file_digest(shard)
    except OSError:
        size, digest = None, None
    if (size, digest) != (done.get("num_bytes"), done.get("digest")):
        logging.warning("%s: %s is not what its done marker vouches for (%s bytes, digest %s; found %s bytes, "
                        "digest %s): tiling the slide again", spec.slide_id, shard, done.get("num_bytes"),
                        done.get("digest"), size, digest)
        return None
    return done


def field_size_level0(slide: slide_reader.Slide, config: PairConfig) -> int:
    """Level-0 px side of a 5x tile's field; raises ResolutionError if the scan is too coarse for the 20x
    region (more than `mpp_tolerance` coarser), unless `allow_upsample`."""
    mpp_20x = config.mpp_5x * pair_records.TILE_5X_PX / pair_records.REGION_20X_PX
    if slide.mpp > mpp_20x * (1 + config.mpp_tolerance) and not config.allow_upsample:
        raise slide_reader.ResolutionError(
            f"{slide.path}: scanned at {slide.mpp:g} µm/px, coarser than the 20x target {mpp_20x:g} µm/px "
            f"(+{config.mpp_tolerance:.0%} tolerance): its 20x regions would be upsampled; rerun with "
            f"--allow_upsample to tile it anyway")
    return int(round(pair_records.TILE_5X_PX * config.mpp_5x / slide.mpp))


def plan_tiles(slide: slide_reader.Slide, spec: inputs.SlideSpec, config: PairConfig, overlay_dir: str | None
               ) -> tuple[tissue.TileGrid, str]:
    """The 5x fields to pair and how they were chosen ('tissue mask' or 'coords h5'); writes the overlay PNG."""
    field = field_size_level0(slide, config)
    thumb, downsample = slide_reader.read_level_image(slide, config.thumb_mpp)
    if spec.coords:
        patches = inputs.read_patch_coords(spec.coords)
        mask = np.zeros(thumb.shape[:2], bool)
        for x, y in np.rint(patches.coords / downsample).astype(int):
            side = max(int(round(patches.patch_size_level0 / downsample)), 1)
            mask[max(y, 0):y + side, max(x, 0):x + side] = True
        if abs(patches.patch_size_level0 - field) <= 0.01 * field:
            width, height = slide.dimensions
            inside = patches.coords[(patches.coords >= 0).all(1) & (patches.coords[:, 0] + field <= width)
                                    & (patches.coords[:, 1] + field <= height)]
            grid = tissue.TileGrid(inside, tissue.tissue_fractions(mask, downsample, inside, field), field)
        else:
            grid = tissue.tile_grid(slide.dimensions, field, mask, downsample, config.min_tissue)
        source = "coords h5"
    else:
        mask = tissue.tissue_mask(thumb, downsample * slide.mpp, config.mask)
        grid = tissue.tile_grid(slide.dimensions, field, mask, downsample, config.min_tissue)
        source = "tissue mask"
    if overlay_dir:
        os.makedirs(overlay_dir, exist_ok=True)
        tissue.write_overlay(os.path.join(overlay_dir, f"{slide.slide_id}.png"), thumb, mask, grid, downsample)
    return grid, source


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """RGB or opaque RGBA image -> baseline JPEG (4:2:0)."""
    colorspace = {"RGB": "RGB", "RGBA": "RGBX"}[image.mode]
    return simplejpeg.encode_jpeg(np.asarray(image), quality=quality, colorspace=colorspace, colorsubsampling="420")


def pair_record(slide: slide_reader.Slide, x: int, y: int, field: int, fraction: float, config: PairConfig) -> bytes:
    """The encoded record of the field at level-0 (x, y): 5x tile [224, 224, 3] + 20x region [896, 896, 3]."""
    image_20x = slide_reader.read_field_image(slide, x, y, field, pair_records.REGION_20X_PX, config.resample)
    if config.low_mag_source == "resize":
        image_5x = image_20x.resize((pair_records.TILE_5X_PX, pair_records.TILE_5X_PX), Image.LANCZOS)
    else:
        image_5x = slide_reader.read_field_image(slide, x, y, field, pair_records.TILE_5X_PX, config.resample)
    return pair_records.encode_pair({
        "image_5x": encode_jpeg(image_5x, config.jpeg_quality),
        "image_20x": encode_jpeg(image_20x, config.jpeg_quality),
        "slide_id": slide.slide_id, "x": x, "y": y,
        "mpp_5x": field * slide.mpp / pair_records.TILE_5X_PX,
        "mpp_20x": field * slide.mpp / pair_records.REGION_20X_PX,
        "tissue_fraction": fraction,
    })


def process_slide(spec: inputs.SlideSpec, config: PairConfig, work_dir: str, overlay_dir: str | None) -> dict:
    """Tile one slide into `work_dir`; returns its done marker, or its failure record (never raises SlideError)."""

    def records_of(slide: slide_reader.Slide) -> tuple[int, Iterator[bytes], dict]:
        grid, source = plan_tiles(slide, spec, config, overlay_dir)
        tiles = zip(grid.coords.tolist(), grid.tissue_fraction.tolist())
        return (len(grid.coords), (pair_record(slide, x, y, grid.field_level0, f, config) for (x, y), f in tiles),
                {"field_level0": grid.field_level0, "tiles_from": source})

    return write_slide_shard(spec, config, work_dir, records_of, unit="pair")


def write_slide_shard(spec: inputs.SlideSpec, config: Any, work_dir: str,
                      records_of: Callable[[slide_reader.Slide], tuple[int, Iterator[bytes], dict]],
                      unit: str = "record") -> dict:
    """Open the slide, write the records `records_of(slide)` gives (count, records, extra done fields) to its
    shard under a temp name and rename it, then the done marker (`num_pairs` = the count); returns the marker,
    or the failure record (written to `failed_path`; never raises on a slide's error: a `SlideError` or a
    library error is recorded with its traceback). `config` has `fingerprint` and `progress`."""
    start = time.time()
    os.makedirs(work_dir, exist_ok=True)
    try:
        with slide_reader.open_slide(spec.path, spec.mpp, spec.slide_id) as slide:
            count, records_iter, extra = records_of(slide)
            final = shard_path(work_dir, spec.slide_id)
            with atomic.target(final) as tmp:
                writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
                try:
                    for record in tqdm(records_iter, total=count, desc=spec.slide_id, unit=unit, leave=False,
                                       disable=not config.progress, mininterval=1.0):
                        writer.write(record)
                finally:
                    writer.close()
            done = {
                "slide_id": spec.slide_id, "path": spec.path, "status": "done", "num_pairs": count,
                "num_bytes": os.path.getsize(final), "digest": atomic.file_digest(final), "mpp_level0": slide.mpp,
                "mpp_source": slide.mpp_source, "backend": slide.backend, **extra,
                "seconds": round(time.time() - start, 3), "fingerprint": config.fingerprint(spec),
            }
        atomic.write_json(done_path(work_dir, spec.slide_id), done)
        if os.path.exists(failed_path(work_dir, spec.slide_id)):
            os.remove(failed_path(work_dir, spec.slide_id))
        return done
    except Exception as err:  # a SlideError, or an unexpected bug or library error: still one slide, reported
        return write_failed(work_dir, failures.Failure.of(spec, err))
