"""One serialized pair record → checked uint8 images → the training element (decode, augment, cut tiles)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
import simplejpeg
from absl import logging

from data_prep import records
from xmag_jax.data import augment

TILE_PX = records.TILE_5X_PX  # 224: the 5x tile and each 20x tile, px
GRID = records.REGION_20X_PX // records.TILE_5X_PX  # 4: the 20x region is GRID x GRID tiles


class BadRecordError(ValueError):
    """A record that cannot be used for training (corrupt proto or JPEG, wrong image size)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """Marker put in place of a record that failed to decode; dropped (and counted) before batching."""

    index: int
    reason: str


def _decode_jpeg(data: bytes, field: str, px: int, index: int) -> np.ndarray:
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
        raise BadRecordError(f"record {index}: field {field!r}: JPEG decode failed: {e}") from e
    if image.shape != (px, px, 3):
        shape = "x".join(map(str, image.shape))
        raise BadRecordError(f"record {index}: field {field!r}: image is {shape}, expected {px}x{px}x3")
    return image


def decode_images(raw: bytes, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Serialized pair → (`image_5x` uint8 `[224, 224, 3]`, `image_20x` uint8 `[896, 896, 3]`).

    Raises BadRecordError naming the record's global source `index` and the failing field.
    """
    try:
        pair = records.decode_pair(raw)
    except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes makes the record bad
        raise BadRecordError(f"record {index}: not a pair record ({type(e).__name__}: {e})") from e
    return (
        _decode_jpeg(pair["image_5x"], "image_5x", records.TILE_5X_PX, index),
        _decode_jpeg(pair["image_20x"], "image_20x", records.REGION_20X_PX, index),
    )


def cut_tiles(region: np.ndarray) -> np.ndarray:
    """The 20x region `[896, 896, 3]` → its tiles `[16, 224, 224, 3]`, row-major (tile k at row k // 4, col k % 4)."""
    return np.ascontiguousarray(
        region.reshape(GRID, TILE_PX, GRID, TILE_PX, 3).swapaxes(1, 2).reshape(GRID * GRID, TILE_PX, TILE_PX, 3)
    )


@dataclasses.dataclass(frozen=True)
class TagIndex(grain.transforms.MapWithIndex):
    """Tags a serialized record with its global source index, kept through shuffle, repeat and sharding.

    Grain passes later epochs' positions past the end (`epoch * num_records + i`), hence the modulo.
    """

    num_records: int

    def map_with_index(self, index: int, raw: bytes) -> tuple[int, bytes]:
        return index % self.num_records, raw


@dataclasses.dataclass(frozen=True)
class DecodeAndAugment(grain.transforms.RandomMap):
    """`(index, bytes)` → `{"image_5x" [V, 224, 224, 3], "tiles_20x" [V, 16, 224, 224, 3], "record_index"}`.

    `views` V augmented views of the pair: view v is the v-th paired draw (`augment.augment_pair`, one draw
    for the 5x tile and its 20x field) from Grain's per-element generator (pipeline seed + element position),
    so view v of an element is the same on every run and after a resume, view 0 is the draw a one-view
    pipeline makes, and the views of a pair are independent draws. A record that fails to decode becomes a
    BadRecord.
    """

    options: augment.AugmentOptions
    views: int = 1

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, Any] | BadRecord:
        index, raw = element
        try:
            image_5x, image_20x = decode_images(raw, index)
        except BadRecordError as e:
            logging.warning("skipping bad record: %s", e)
            return BadRecord(index=index, reason=str(e))
        views = [augment.augment_pair(image_5x, image_20x, self.options, rng) for _ in range(self.views)]
        return {"image_5x": np.stack([student for student, _ in views]),
                "tiles_20x": np.stack([cut_tiles(teacher) for _, teacher in views]),
                "record_index": np.int64(index)}
