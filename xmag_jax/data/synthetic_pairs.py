"""Small synthetic pair shards for tests and the input benchmark, written with data_prep's record format.

Each field is a 896 px 20x region whose 4x4 tiles have distinct flat colours (so tile order is checkable
after JPEG), with a mild texture, and the 5x tile is its 4x4 block-mean downsample (the same field).
Tile k of record i has the colour `tile_colour(i, k)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import simplejpeg
from array_record.python.array_record_module import ArrayRecordWriter

from xmag_jax import atomic, geometry
from xmag_jax.formats import pair_records

REGION_PX, TILE_PX = geometry.REGION_20X_PX, geometry.TILE_PX
CORRUPTIONS = ("jpeg", "size", "proto")


def tile_colour(index: int, k: int) -> np.ndarray:
    """RGB uint8 `[3]` of tile k (row-major, 0..15) of record `index`; R encodes k, B encodes index % 8."""
    return np.array([24 + 14 * k, 200 - 6 * k, 40 + 24 * (index % 8)], dtype=np.uint8)


def synthetic_field(index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(5x `[224, 224, 3]`, 20x `[896, 896, 3]`) uint8 images of one synthetic field."""
    grid = geometry.FIELD_SIDE
    colours = np.stack([tile_colour(index, k) for k in range(geometry.FIELD_TILES)]).reshape(grid, grid, 3)
    region = np.repeat(np.repeat(colours, TILE_PX, axis=0), TILE_PX, axis=1).astype(np.int16)
    region += rng.integers(-6, 7, size=(REGION_PX, REGION_PX, 1), dtype=np.int16)
    region = np.clip(region, 0, 255).astype(np.uint8)
    small = region.reshape(TILE_PX, grid, TILE_PX, grid, 3).mean(axis=(1, 3))
    return np.round(small).astype(np.uint8), region


def _record(index: int, rng: np.random.Generator, corruption: str | None) -> bytes:
    if corruption == "proto":
        return b"\x00not a tf.Example" + rng.bytes(64)
    image_5x, image_20x = synthetic_field(index, rng)
    jpeg_5x = simplejpeg.encode_jpeg(image_5x, quality=90)
    jpeg_20x = simplejpeg.encode_jpeg(image_20x, quality=90)
    if corruption == "size":
        jpeg_20x = simplejpeg.encode_jpeg(np.ascontiguousarray(image_20x[:, :800]), quality=90)
    elif corruption == "jpeg":
        jpeg_20x = jpeg_20x[:4] + rng.bytes(len(jpeg_20x) // 8)
    return pair_records.encode_pair({
        "image_5x": jpeg_5x,
        "image_20x": jpeg_20x,
        "slide_id": f"synthetic_{index // 100:03d}",
        "x": (index % 100) * REGION_PX * 2,
        "y": 0,
        "mpp_5x": geometry.MPP_5X,
        "mpp_20x": geometry.MPP_20X,
        "tissue_fraction": 1.0,
    })


def write_pair_shards(
    out_dir: str | os.PathLike,
    num_records: int,
    *,
    num_shards: int = 2,
    split: str = "train",
    corrupt: Mapping[int, str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Writes `num_records` pairs (global index = order written) over `num_shards` shards; returns their paths.

    `corrupt` maps a record index to one of CORRUPTIONS: `jpeg` (garbled 20x JPEG), `size` (20x image
    896x800), `proto` (bytes that are not a pair record). Each shard is written to a temp name, then renamed.
    """
    corrupt = dict(corrupt or {})
    unknown = {k: v for k, v in corrupt.items() if v not in CORRUPTIONS}
    if unknown:
        raise ValueError(f"corrupt: unknown kinds {unknown}; expected one of {CORRUPTIONS}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_records, num_shards + 1).astype(int)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(os.fspath(out_dir), pair_records.shard_name(split, shard, num_shards))
        with atomic.target(path) as tmp:
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            for index in range(bounds[shard], bounds[shard + 1]):
                writer.write(_record(index, rng, corrupt.get(index)))
            writer.close()
        paths.append(path)
    return paths
