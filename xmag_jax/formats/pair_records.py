"""The tile-pair record: one 5x tile and the 20x region of exactly the same level-0 field.

Records are serialized as `tf.train.Example` protos through TFDS's own serializer, which uses the
protobuf classes bundled with `tensorflow_datasets` (no TensorFlow needed). So the same bytes decode with
`decode_pair` here, with `tfds.data_source(...)`/`tfds.builder_from_directory(DIR)` (images decoded to
uint8 arrays), or with TensorFlow's own `tf.io.parse_single_example` if a user has it.

Shards live as `DIR/xmag_pairs-{split}.array_record-{i:05d}-of-{n:05d}` next to TFDS's
`dataset_info.json` and `features.json`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import numpy as np
from array_record.python import array_record_module
from tensorflow_datasets.core import features as tfds_features

from xmag_jax import geometry
from xmag_jax.errors import UserError
from xmag_jax.formats import tf_example

DATASET_NAME = "xmag_pairs"
FILE_FORMAT = "array_record"
# The record's image sides (`xmag_jax.geometry`): the 20x region is the 5x tile's field as 4 x 4 tiles, so
# mpp_5x / mpp_20x = geometry.FIELD_SIDE.
TILE_5X_PX = geometry.TILE_PX
REGION_20X_PX = geometry.REGION_20X_PX
GEOMETRY_TOLERANCE = 0.01
# How the 5x tile is made: read from the slide's pyramid at mpp_5x, or XMAG's Lanczos resize of the 20x region.
LOW_MAG_SOURCES = ("pyramid", "resize")
METADATA_FILE = "metadata.json"  # TFDS `MetadataDict` beside dataset_info.json


class GeometryError(UserError, ValueError):
    """µm/px of the two magnifications that are not the 4 x 4 field geometry."""

FIELDS = ("image_5x", "image_20x", "slide_id", "x", "y", "mpp_5x", "mpp_20x", "tissue_fraction")


@functools.cache
def features() -> tfds_features.FeaturesDict:
    """The TFDS feature description of one pair record.

    image_5x: JPEG, [224, 224, 3] uint8 at ~2.0 µm/px; image_20x: JPEG, [896, 896, 3] uint8 at ~0.5 µm/px
    covering the same level-0 field; x, y: level-0 top-left px; mpp_5x, mpp_20x: µm/px of the two images;
    tissue_fraction: fraction of the 5x tile covered by the tissue mask, in [0, 1].
    """
    return tfds_features.FeaturesDict({
        "image_5x": tfds_features.Image(shape=(TILE_5X_PX, TILE_5X_PX, 3), encoding_format="jpeg"),
        "image_20x": tfds_features.Image(shape=(REGION_20X_PX, REGION_20X_PX, 3), encoding_format="jpeg"),
        "slide_id": tfds_features.Text(),
        "x": tfds_features.Scalar(np.int64, doc="level-0 top-left x, px"),
        "y": tfds_features.Scalar(np.int64, doc="level-0 top-left y, px"),
        "mpp_5x": tfds_features.Scalar(np.float32, doc="µm/px of image_5x"),
        "mpp_20x": tfds_features.Scalar(np.float32, doc="µm/px of image_20x"),
        "tissue_fraction": tfds_features.Scalar(np.float32, doc="tissue fraction of the field, 0..1"),
    })


@functools.cache
def _codec() -> tf_example.ExampleCodec:
    return tf_example.ExampleCodec(features())


def encode_pair(pair: dict[str, Any]) -> bytes:
    """Serialize one pair (a dict with exactly `FIELDS`; images as JPEG bytes) to a tf.Example proto."""
    missing = [k for k in FIELDS if k not in pair]
    extra = [k for k in pair if k not in FIELDS]
    if missing or extra:
        raise ValueError(f"pair record: missing fields {missing}, unexpected fields {extra}; expected {FIELDS}")
    example = {
        "image_5x": tf_example.check_jpeg("pair field 'image_5x'", pair["image_5x"]),
        "image_20x": tf_example.check_jpeg("pair field 'image_20x'", pair["image_20x"]),
        "slide_id": str(pair["slide_id"]),
        "x": int(pair["x"]),
        "y": int(pair["y"]),
        "mpp_5x": float(pair["mpp_5x"]),
        "mpp_20x": float(pair["mpp_20x"]),
        "tissue_fraction": float(pair["tissue_fraction"]),
    }
    return _codec().encode(example)


def decode_pair(data: bytes) -> dict[str, Any]:
    """Parse bytes written by `encode_pair` back to the dict (images stay JPEG bytes; no image decode)."""
    raw = _codec().decode(data)
    return {
        "image_5x": bytes(raw["image_5x"]),
        "image_20x": bytes(raw["image_20x"]),
        "slide_id": bytes(raw["slide_id"]).decode("utf-8"),
        "x": int(raw["x"]),
        "y": int(raw["y"]),
        "mpp_5x": float(raw["mpp_5x"]),
        "mpp_20x": float(raw["mpp_20x"]),
        "tissue_fraction": float(raw["tissue_fraction"]),
    }


def shard_name(split: str, index: int, num_shards: int, dataset_name: str = DATASET_NAME) -> str:
    """TFDS file name of one shard, e.g. `xmag_pairs-train.array_record-00000-of-00004`."""
    return f"{dataset_name}-{split}.{FILE_FORMAT}-{index:05d}-of-{num_shards:05d}"


def shard_paths(dataset_dir: str | os.PathLike, split: str, dataset_name: str = DATASET_NAME) -> list[str]:
    """The complete shards of `split` in `dataset_dir`, sorted; temp files and partial sets never count.

    Raises FileNotFoundError if the split has no shards, ValueError if the set is incomplete
    (a shard `i-of-N` is missing or shards disagree on N).
    """
    dataset_dir = os.fspath(dataset_dir)
    pattern = re.compile(rf"^{re.escape(dataset_name)}-{re.escape(split)}\.{FILE_FORMAT}-(\d{{5}})-of-(\d{{5}})$")
    found: dict[int, set[int]] = {}
    for name in os.listdir(dataset_dir):
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise FileNotFoundError(f"{dataset_dir}: no shards for split {split!r} "
                                f"(expected {shard_name(split, 0, 1, dataset_name)}...)")
    if len(found) > 1 or set(range(next(iter(found)))) != next(iter(found.values())):
        raise ValueError(f"{dataset_dir}: incomplete shard set for split {split!r}: {sorted(found.items())}")
    num = next(iter(found))
    return [os.path.join(dataset_dir, shard_name(split, i, num, dataset_name)) for i in range(num)]


def check_ratio(mpp_5x: float, mpp_20x: float, where: str) -> None:
    """Raises GeometryError unless mpp_5x / mpp_20x is geometry.FIELD_SIDE (4) within GEOMETRY_TOLERANCE."""
    side = geometry.FIELD_SIDE
    if not (mpp_5x > 0 and mpp_20x > 0) or abs(mpp_5x / mpp_20x / side - 1) > GEOMETRY_TOLERANCE:
        raise GeometryError(f"{where}: mpp_5x {mpp_5x:g} / mpp_20x {mpp_20x:g} µm/px is not the field geometry "
                            f"(one {TILE_5X_PX} px 5x tile = {side} x {side} tiles of the {REGION_20X_PX} px 20x "
                            f"region: the ratio must be {side}, e.g. {geometry.MPP_5X:g} and {geometry.MPP_20X:g})")


def dataset_metadata(*, mpp_5x: float, mpp_20x: float, low_mag_source: str, resample: str,
                     allow_upsample: bool) -> dict[str, Any]:
    """What `metadata.json` records about how the pairs were made (µm/px targets, px sizes, 5x source)."""
    if low_mag_source not in LOW_MAG_SOURCES:
        raise ValueError(f"low_mag_source {low_mag_source!r}: expected one of {LOW_MAG_SOURCES}")
    return {"mpp_5x": float(mpp_5x), "mpp_20x": float(mpp_20x), "tile_5x_px": TILE_5X_PX,
            "region_20x_px": REGION_20X_PX, "low_mag_source": low_mag_source, "resample": resample,
            "allow_upsample": bool(allow_upsample)}


def read_metadata(dataset_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The dataset's `metadata.json` (µm/px targets, 5x source, ...) written by tile_pairs; None if absent."""
    try:
        with open(os.path.join(os.fspath(dataset_dir), METADATA_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise GeometryError(f"{os.path.join(os.fspath(dataset_dir), METADATA_FILE)}: unreadable: {err}") from None


def check_field_geometry(dataset_dir: str | os.PathLike, split: str) -> dict[str, float]:
    """Refuses a dataset whose µm/px are not the 4 x 4 field geometry; returns {'mpp_5x', 'mpp_20x'}.

    Checks the targets in `metadata.json` (datasets written before it existed have none) and the µm/px
    stored in the first decodable record of `split` (a bad record is the bad-record budget's business).
    Raises GeometryError naming the dataset.
    """
    dataset_dir = os.fspath(dataset_dir)
    meta = read_metadata(dataset_dir)
    if meta is not None:
        check_ratio(float(meta.get("mpp_5x", 0)), float(meta.get("mpp_20x", 0)),
                    f"{os.path.join(dataset_dir, METADATA_FILE)}")
    reader = array_record_module.ArrayRecordReader(shard_paths(dataset_dir, split)[0])
    try:
        head = []
        for index in range(min(reader.num_records(), 8)):
            try:  # one at a time: a record in a corrupt block must not hide the readable ones
                head.append(reader.read([index])[0])
            except RuntimeError:  # Riegeli: a bad record, counted by the input pipeline when it reads it
                head.append(None)
    finally:
        reader.close()
    for index, data in enumerate(head):
        try:
            pair = decode_pair(data)
        except Exception:  # noqa: BLE001 - any parse failure: a bad record, try the next one
            continue
        check_ratio(pair["mpp_5x"], pair["mpp_20x"],
                    f"{dataset_dir} split {split!r} record {index} (slide {pair['slide_id']})")
        return {"mpp_5x": pair["mpp_5x"], "mpp_20x": pair["mpp_20x"]}
    return {"mpp_5x": float(meta["mpp_5x"]), "mpp_20x": float(meta["mpp_20x"])} if meta else {}

