"""The teacher-target cache format: one ArrayRecord record per (pair, geometric state), TFDS metadata.

A cache directory `CACHE` holds, for the source split's pair shards `xmag_pairs-{split}.array_record-i-of-n`:

    xmag_teacher_targets-{split}.array_record-{i:05d}-of-{n:05d}   shard i: the targets of source shard i
    dataset_info.json, features.json, metadata.json                 TFDS metadata, written last
    work/{shard name}.done.json                                     per-shard done markers (the writer's)

Cache shard i has `states × len(source shard i)` records: pair j of the shard, state s (position in
`metadata.json`'s `states`) is record `j·S + s`, so over the concatenated shards the global key of
(pair index p, state s) is `p·S + s`. Each record is a `tf.train.Example` (TFDS serializer):

- `record_index` int64: the pair's global index in the source split;
- `d4` int64: the geometric state, a D4 element as in `xmag_jax.data.augment.AugmentDraw.d4`;
- `error` text: empty, or why the source record was bad (then the targets are zeros and the pair is
  skipped by every reader, counted as a bad record);
- `tiles` `[16, Et]`: the teacher's embedding of each 20x tile of the field after the state's transform;
- `tokens` `[G, G, Dt]` (only when written with tokens): the teacher's patch-token mosaic average-pooled
  to the student's G x G grid.

Targets are stored raw little-endian (TFDS `Encoding.BYTES`): float32, or bfloat16 as its uint16 bit
patterns (`features.json` then says uint16; `metadata.json` `targets.dtype` says bfloat16). They are the
teacher's outputs before any centring (`loss.center_targets` centres them in the step).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import ml_dtypes
import numpy as np
from tensorflow_datasets.core import features as tfds_features

from xmag_jax.errors import UserError
from xmag_jax.formats import pair_records, tf_example

DATASET_NAME = "xmag_teacher_targets"
FORMAT_VERSION = 1
FIELD_TILES = 16
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_STORED = {"float32": np.float32, "bfloat16": np.uint16}  # what the bytes are in features.json
WORK_DIR = "work"
COUNTS = ("num_pairs", "bad_pairs", "shard_lengths")  # metadata.json entries the writer adds when it finishes


class CacheError(UserError):
    """A cache directory that cannot be used: incomplete, unreadable, or not what a config needs."""


def geometric_states(d4: bool, flips_only: bool) -> tuple[int, ...]:
    """The D4 elements an augmentation can draw: none → (0,), flips (h, v independent) → the identity,
    the two mirrors and the half turn, D4 → all 8 (see `augment.AugmentDraw`)."""
    if not d4:
        return (0,)
    if flips_only:
        return (0, 4, 6, 2)  # augment.FLIPS_TO_D4 of (no flip, h, v, both)
    return tuple(range(8))


@functools.cache
def features(embed_dim: int, token_grid: int | None, token_dim: int | None, dtype: str) -> tfds_features.FeaturesDict:
    """The TFDS feature description of one record (see the module doc); `token_grid` None: no tokens."""
    stored = _STORED[dtype]
    spec = {
        "record_index": tfds_features.Scalar(np.int64, doc="global index of the pair in the source split"),
        "d4": tfds_features.Scalar(np.int64, doc="D4 element applied to the 20x field (augment.AugmentDraw.d4)"),
        "error": tfds_features.Text(doc="empty, or why the source record was bad"),
        "tiles": tfds_features.Tensor(shape=(FIELD_TILES, embed_dim), dtype=stored,
                                      encoding=tfds_features.Encoding.BYTES, doc=f"[16, Et] tile embeddings, {dtype}"),
    }
    if token_grid is not None:
        spec["tokens"] = tfds_features.Tensor(shape=(token_grid, token_grid, token_dim), dtype=stored,
                                              encoding=tfds_features.Encoding.BYTES,
                                              doc=f"[G, G, Dt] pooled patch tokens, {dtype}")
    return tfds_features.FeaturesDict(spec)


@functools.cache
def _codec(embed_dim: int, token_grid: int | None, token_dim: int | None, dtype: str) -> tf_example.ExampleCodec:
    return tf_example.ExampleCodec(features(embed_dim, token_grid, token_dim, dtype))


class RecordCodec:
    """Encodes and decodes records of one cache (its dims and dtype, from `metadata.json` `targets`)."""

    def __init__(self, targets: dict[str, Any]):
        self.dtype = targets["dtype"]
        if self.dtype not in DTYPES:
            raise CacheError(f"targets.dtype {self.dtype!r}: expected one of {sorted(DTYPES)}")
        self.key = (int(targets["embed_dim"]), targets.get("token_grid"), targets.get("token_dim"), self.dtype)
        self.features = features(*self.key)

    def _store(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32).astype(DTYPES[self.dtype]).view(_STORED[self.dtype])

    def encode(self, record_index: int, d4: int, tiles: np.ndarray, tokens: np.ndarray | None,
               error: str = "") -> bytes:
        example = {"record_index": int(record_index), "d4": int(d4), "error": error, "tiles": self._store(tiles)}
        if "tokens" in self.features:
            example["tokens"] = self._store(tokens)
        return _codec(*self.key).encode(example)

    def decode(self, data: bytes) -> dict[str, Any]:
        """Bytes → {record_index, d4, error, tiles float32 [16, Et], tokens float32 [G, G, Dt] or None}."""
        raw = _codec(*self.key).decode(data)

        def load(name: str, shape: tuple[int, ...]) -> np.ndarray:
            stored = np.frombuffer(raw[name], _STORED[self.dtype])
            return stored.view(DTYPES[self.dtype]).astype(np.float32).reshape(shape)

        embed_dim, grid, token_dim, _ = self.key
        return {"record_index": int(raw["record_index"]), "d4": int(raw["d4"]),
                "error": bytes(raw["error"]).decode("utf-8"), "tiles": load("tiles", (FIELD_TILES, embed_dim)),
                "tokens": load("tokens", (grid, grid, token_dim)) if grid is not None else None}


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{DATASET_NAME}-{split}.{pair_records.FILE_FORMAT}-{index:05d}-of-{num_shards:05d}"


def shard_paths(cache_dir: str | os.PathLike, split: str, num_shards: int) -> list[str]:
    """The `num_shards` shard paths of `split` in `cache_dir` (whether they exist or not)."""
    return [os.path.join(os.fspath(cache_dir), shard_name(split, i, num_shards)) for i in range(num_shards)]


def done_path(cache_dir: str | os.PathLike, shard: str) -> str:
    return os.path.join(os.fspath(cache_dir), WORK_DIR, f"{os.path.basename(shard)}.done.json")


def source_fingerprint(source_dir: str | os.PathLike, split: str) -> dict[str, Any]:
    """Identity of a pair split: 16 hex digits of sha256 over its shard names and byte sizes and its
    `dataset_info.json` (when present), plus the shard names. Reads no shard (cheap on a mounted bucket)."""
    paths = pair_records.shard_paths(source_dir, split)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)};".encode())
    info = os.path.join(os.fspath(source_dir), "dataset_info.json")
    if os.path.exists(info):
        with open(info, "rb") as f:
            digest.update(f.read())
    return {"fingerprint": digest.hexdigest()[:16], "shards": [os.path.basename(p) for p in paths]}


def spec_digest(metadata: dict[str, Any]) -> str:
    """16 hex digits identifying what a cache holds: every metadata entry except where it was read from
    (`source.dir`) and the counts the writer adds at the end."""
    keep = {k: v for k, v in metadata.items() if k not in COUNTS}
    keep["source"] = {k: v for k, v in metadata["source"].items() if k != "dir"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """`metadata.json` of a finished cache; CacheError when the directory is not one (no
    `dataset_info.json`: the writer has not finished) or the file is unreadable or of another version."""
    cache_dir = os.fspath(cache_dir)
    if not os.path.isdir(cache_dir):
        raise CacheError(f"{cache_dir}: no such teacher-target cache directory")
    if not os.path.exists(os.path.join(cache_dir, "dataset_info.json")):
        raise CacheError(f"{cache_dir}: not a finished teacher-target cache (no dataset_info.json); run or "
                         "resume `python -m xmag_jax.teacher_cache` on it")
    path = os.path.join(cache_dir, pair_records.METADATA_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable cache metadata ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {meta.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}; write the cache again")
    return meta
