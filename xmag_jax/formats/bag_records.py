"""The bag-tile record: one tissue tile of a slide at the target µm/px (5x), for end-to-end MIL training.

The sibling of `records` (the pair schema): `tf.train.Example` protos through TFDS's serializer, in
`DIR/xmag_bags-train.array_record-{i:05d}-of-{n:05d}` next to TFDS's `dataset_info.json`/`features.json`.
The tiles of one slide are contiguous, in the tile grid's order; `DIR/slides.csv` gives each slide's
first record (global index over the shards in order) and tile count, so a reader finds a slide's tiles
without scanning.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import Any

import numpy as np
from tensorflow_datasets.core import features as tfds_features

from xmag_jax import atomic
from xmag_jax.errors import UserError
from xmag_jax.formats import pair_records, tf_example

DATASET_NAME = "xmag_bags"
SPLIT = "train"  # every slide: folds are drawn by the trainer, by slide
SLIDES_FILE = "slides.csv"
SLIDES_COLUMNS = ("slide_id", "first", "tiles", "mpp", "patch_px", "field_level0", "level0_mpp", "path")
FIELDS = ("image", "slide_id", "x", "y", "mpp")


class BagsError(UserError, ValueError):
    """A bag dataset folder that is missing, incomplete or not written by tile_bags."""


@functools.cache
def features() -> tfds_features.FeaturesDict:
    """image: JPEG `[patch_px, patch_px, 3]` uint8 at `mpp` µm/px; x, y: level-0 top-left px of its field."""
    return tfds_features.FeaturesDict({
        "image": tfds_features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "slide_id": tfds_features.Text(),
        "x": tfds_features.Scalar(np.int64, doc="level-0 top-left x, px"),
        "y": tfds_features.Scalar(np.int64, doc="level-0 top-left y, px"),
        "mpp": tfds_features.Scalar(np.float32, doc="µm/px of image"),
    })


@functools.cache
def _codec() -> tf_example.ExampleCodec:
    return tf_example.ExampleCodec(features())


def encode_tile(tile: dict[str, Any]) -> bytes:
    """Serialize one tile (a dict with exactly `FIELDS`; `image` as JPEG bytes)."""
    if sorted(tile) != sorted(FIELDS):
        raise ValueError(f"bag tile record: fields {sorted(tile)}; expected {sorted(FIELDS)}")
    example = {"image": tf_example.check_jpeg("bag tile field 'image'", tile["image"]),
               "slide_id": str(tile["slide_id"]), "x": int(tile["x"]), "y": int(tile["y"]), "mpp": float(tile["mpp"])}
    return _codec().encode(example)


def decode_tile(data: bytes) -> dict[str, Any]:
    """Bytes written by `encode_tile` back to the dict (the image stays JPEG bytes)."""
    raw = _codec().decode(data)
    return {"image": bytes(raw["image"]), "slide_id": bytes(raw["slide_id"]).decode("utf-8"),
            "x": int(raw["x"]), "y": int(raw["y"]), "mpp": float(raw["mpp"])}


def shard_paths(dataset_dir: str | os.PathLike) -> list[str]:
    """The complete shard set of a bag dataset, in order (see `pair_records.shard_paths`)."""
    return pair_records.shard_paths(dataset_dir, SPLIT, DATASET_NAME)


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    """One slide of a bag dataset: records `first .. first + tiles - 1`, tiles of `patch_px` px at `mpp`
    µm/px, each a field of `field_level0` level-0 px (level 0 at `level0_mpp` µm/px)."""

    slide_id: str
    first: int
    tiles: int
    mpp: float
    patch_px: int
    field_level0: int
    level0_mpp: float
    path: str


def write_slides(path: str, entries: list[SlideEntry]) -> None:
    """`slides.csv` (columns `SLIDES_COLUMNS`), written atomically (`atomic.target`)."""
    with atomic.target(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SLIDES_COLUMNS)
        writer.writerows([getattr(e, c) for c in SLIDES_COLUMNS] for e in entries)


def read_slides(dataset_dir: str | os.PathLike) -> dict[str, SlideEntry]:
    """slide_id -> `SlideEntry` from `DIR/slides.csv`; BagsError (one line) if absent or malformed."""
    path = os.path.join(os.fspath(dataset_dir), SLIDES_FILE)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {r["slide_id"]: SlideEntry(r["slide_id"], int(r["first"]), int(r["tiles"]), float(r["mpp"]),
                                          int(r["patch_px"]), int(r["field_level0"]), float(r["level0_mpp"]),
                                          r["path"]) for r in rows}
    except FileNotFoundError:
        raise BagsError(f"{path}: not found; expected a bag dataset written by `python -m data_prep.tile_bags`"
                        ) from None
    except (KeyError, TypeError, ValueError) as err:
        raise BagsError(f"{path}: malformed ({type(err).__name__}: {err}); expected columns {SLIDES_COLUMNS}"
                        ) from None
