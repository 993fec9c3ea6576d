"""Pair shards → one serialized pair record → checked uint8 images → the training element (decode, augment,
cut tiles).

`PairSource` reads the ArrayRecord shards: a shard that cannot be opened (truncated, its index overwritten)
stops the job with `ShardError` naming it and what to do; a record that cannot be read from an opened shard
(a corrupt chunk) becomes an `UnreadableRecord`, which decoding turns into a bad record, counted against
`data.max_bad_record_fraction` like one that fails to decode.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, SupportsIndex

import grain
import numpy as np
import simplejpeg
from absl import logging
from array_record.python import array_record_module

from xmag_jax import errors, geometry
from xmag_jax.data import augment
from xmag_jax.formats import pair_records


class BadRecordError(ValueError):
    """A record that cannot be used for training (corrupt proto or JPEG, wrong image size)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """Marker put in place of a record that failed to decode; dropped (and counted) before batching."""

    index: int
    reason: str


class ShardError(errors.UserError):
    """A pair shard that cannot be opened; the message names it and what to do."""


@dataclasses.dataclass(frozen=True)
class UnreadableRecord:
    """What `PairSource` gives for a record whose bytes cannot be read from its shard; `reason` names both."""

    reason: str


class PairSource(grain.sources.ArrayRecordDataSource):
    """Grain's ArrayRecord source over pair shards (global index = position in the concatenated `paths`),
    with the shard named in every read failure. `what`/`remedy` word the error of a shard that does not open
    (other shard kinds, e.g. teacher-target caches, reuse this source)."""

    def __init__(self, paths: Sequence[str | os.PathLike], *, what: str = "pair shard", remedy: str = ""):
        try:
            super().__init__([os.fspath(p) for p in paths])
        except RuntimeError as e:  # Riegeli: a corrupt footer or index (a truncated or overwritten shard)
            raise ShardError(_unopenable(paths, e, what, remedy or _REPAIR_PAIRS)) from e

    def __getitem__(self, record_key: SupportsIndex) -> bytes | UnreadableRecord:
        try:
            return super().__getitem__(record_key)
        except RuntimeError as e:  # Riegeli: a corrupt chunk inside a shard whose index is intact
            shard, position = self._reader_idx_and_position(record_key)
            return UnreadableRecord(f"{self.paths[shard]}: record {position} cannot be read ({e})")


_REPAIR_PAIRS = ("re-run `python -m data_prep.tile_pairs` with the same options: it re-assembles the split from "
                 "OUT/work (finished slides are not tiled again; delete a corrupt work/{slide_id}.array_record and "
                 "its .done.json to tile that slide again)")


def _unopenable(paths: Sequence[str | os.PathLike], error: RuntimeError, what: str, remedy: str) -> str:
    """Names the first shard of `paths` that does not open (`error` is what opening them all raised)."""
    for path in paths:
        try:
            array_record_module.ArrayRecordReader(os.fspath(path)).close()
        except RuntimeError as e:
            error = e
            break
    else:
        path = f"one of {len(paths)} shards in {os.path.dirname(os.fspath(paths[0]))}"
    return f"{path}: {what} cannot be opened, it is truncated or overwritten ({error}); {remedy}"


def _decode_jpeg(data: bytes, field: str, px: int, index: int) -> np.ndarray:
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
        raise BadRecordError(f"record {index}: field {field!r}: JPEG decode failed: {e}") from e
    if image.shape != (px, px, 3):
        shape = "x".join(map(str, image.shape))
        raise BadRecordError(f"record {index}: field {field!r}: image is {shape}, expected {px}x{px}x3")
    return image


def decode_images(raw: bytes | UnreadableRecord, index: int, *, with_20x: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Serialized pair → (`image_5x` uint8 `[224, 224, 3]`, `image_20x` uint8 `[896, 896, 3]`, or None
    without `with_20x`: its JPEG is then not decoded).

    Raises BadRecordError naming the record's global source `index` and the failing field (or, for an
    `UnreadableRecord`, its shard).
    """
    if isinstance(raw, UnreadableRecord):
        raise BadRecordError(f"record {index}: {raw.reason}")
    try:
        pair = pair_records.decode_pair(raw)
    except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes makes the record bad
        raise BadRecordError(f"record {index}: not a pair record ({type(e).__name__}: {e})") from e
    image_5x = _decode_jpeg(pair["image_5x"], "image_5x", pair_records.TILE_5X_PX, index)
    if not with_20x:
        return image_5x, None
    return image_5x, _decode_jpeg(pair["image_20x"], "image_20x", pair_records.REGION_20X_PX, index)


def cut_tiles(region: np.ndarray) -> np.ndarray:
    """The 20x region `[896, 896, 3]` → its tiles `[16, 224, 224, 3]`, row-major (tile k at row k // 4, col k % 4)."""
    side, px = geometry.FIELD_SIDE, geometry.TILE_PX
    return np.ascontiguousarray(
        region.reshape(side, px, side, px, 3).swapaxes(1, 2).reshape(geometry.FIELD_TILES, px, px, 3)
    )


@dataclasses.dataclass(frozen=True)
class TagIndex(grain.transforms.MapWithIndex):
    """Tags a serialized record with its global source index, kept through shuffle, repeat and sharding.

    Grain passes later epochs' positions past the end (`epoch * num_records + i`), hence the modulo.
    """

    num_records: int

    def map_with_index(self, index: int, raw: bytes | UnreadableRecord) -> tuple[int, bytes | UnreadableRecord]:
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
