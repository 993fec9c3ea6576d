"""Random access to a finished teacher-target cache by (pair index, geometric state), and the Grain map that
trains from it: decode the 5x tile only, draw the augmentation as live training does, fetch the targets.

A cache shard that does not open, or whose record count is not `states × pairs` of its source shard, stops
the job with `pairs.ShardError` naming it; a record that cannot be read or decoded, belongs to another pair
or state, or marks a bad source record becomes a bad record (counted against
`data.max_bad_record_fraction` like a pair that fails to decode).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module

from xmag_jax.data import augment, pairs
from xmag_jax.teacher_cache import records

_REPAIR = ("rerun `python -m xmag_jax.teacher_cache` with the same options and --out: it rewrites every shard "
           "that is not what its done marker (work/SHARD.done.json) vouches for")


class TargetCache:
    """A finished cache directory: `get(pair_index, d4)` → `{"tiles" [16, Et], "tokens" [G, G, Dt] | None}`
    float32, or BadRecordError. Picklable (Grain workers reopen the shards)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = os.fspath(cache_dir)
        self.meta = records.read_metadata(self.cache_dir)
        self.codec = records.RecordCodec(self.meta["targets"])
        self.states = tuple(self.meta["states"])
        lengths = self.meta["shard_lengths"]
        self.paths = records.shard_paths(self.cache_dir, self.meta["source"]["split"], len(lengths))
        for path, pairs_in_shard in zip(self.paths, lengths):
            expected = pairs_in_shard * len(self.states)
            found = num_records(path)
            if found != expected:
                raise pairs.ShardError(f"{path}: teacher-target shard has {found} records, expected {expected} "
                                       f"({pairs_in_shard} pairs x {len(self.states)} states); {_REPAIR}")
        self._source: pairs.PairSource | None = None

    @property
    def has_tokens(self) -> bool:
        return self.meta["targets"].get("token_grid") is not None

    def __len__(self) -> int:
        return int(self.meta["num_pairs"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def _records(self) -> pairs.PairSource:
        if self._source is None:
            self._source = pairs.PairSource(self.paths, what="teacher-target shard", remedy=_REPAIR)
        return self._source

    def get(self, pair_index: int, d4: int) -> dict[str, np.ndarray | None]:
        """Targets of pair `pair_index` (global source index) under D4 element `d4`; BadRecordError naming the
        record when they cannot be had."""
        if d4 not in self.states:
            raise pairs.BadRecordError(f"record {pair_index}: state d4={d4} is not in the cache {self.cache_dir} "
                                       f"(states {list(self.states)})")
        key = pair_index * len(self.states) + self.states.index(d4)
        raw = self._records()[key]
        if isinstance(raw, pairs.UnreadableRecord):
            raise pairs.BadRecordError(f"record {pair_index}: teacher targets: {raw.reason}")
        try:
            rec = self.codec.decode(raw)
        except Exception as e:  # noqa: BLE001 - any parser failure on stored bytes makes the record bad
            raise pairs.BadRecordError(f"record {pair_index}: teacher-target record {key} of {self.cache_dir} does "
                                       f"not decode ({type(e).__name__}: {e})") from e
        if (rec["record_index"], rec["d4"]) != (pair_index, d4):
            raise pairs.BadRecordError(f"record {pair_index}: teacher-target record {key} of {self.cache_dir} "
                                       f"holds pair {rec['record_index']} state {rec['d4']}, expected "
                                       f"{pair_index} state {d4}")
        if rec["error"]:
            raise pairs.BadRecordError(f"record {pair_index}: bad when the cache was written: {rec['error']}")
        return {"tiles": rec["tiles"], "tokens": rec["tokens"]}


def num_records(path: str, what: str = "teacher-target shard", remedy: str = _REPAIR) -> int:
    """Records in one ArrayRecord shard (reads its footer only); ShardError naming it when it does not open."""
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except (RuntimeError, OSError) as e:  # Riegeli: missing, truncated, or a corrupt footer
        raise pairs.ShardError(f"{path}: {what} cannot be opened, it is missing, truncated or overwritten ({e}); "
                               f"{remedy}") from e


@dataclasses.dataclass(frozen=True)
class DecodeStudentAndFetchTargets(grain.transforms.RandomMap):
    """`(index, bytes)` → `{"image_5x" [V, 224, 224, 3] uint8, "target_tiles" [V, 16, Et], "target_tokens"
    [V, G, G, Dt] (when cached), "record_index"}`: the cached-teacher twin of `pairs.DecodeAndAugment`.

    View v's draw is the one live training makes for it (same generator, `augment.draw` once per view in
    order); its geometric state picks the cached targets and transforms the 5x tile, its colour/HED jitter
    goes to the 5x tile only (the cache holds targets of the un-jittered field). The 20x JPEG is not decoded.
    """

    options: augment.AugmentOptions
    cache: TargetCache
    views: int = 1

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, Any] | pairs.BadRecord:
        index, raw = element
        try:
            image_5x, _ = pairs.decode_images(raw, index, with_20x=False)
            draws = [augment.draw(self.options, rng) for _ in range(self.views)]
            targets = [self.cache.get(index, d.d4) for d in draws]
        except pairs.BadRecordError as e:
            logging.warning("skipping bad record: %s", e)
            return pairs.BadRecord(index=index, reason=str(e))
        out = {"image_5x": np.stack([augment.apply_d4(augment.apply_photometric(image_5x, d), d.d4) for d in draws]),
               "target_tiles": np.stack([t["tiles"] for t in targets]), "record_index": np.int64(index)}
        if self.cache.has_tokens:
            out["target_tokens"] = np.stack([t["tokens"] for t in targets])
        return out
