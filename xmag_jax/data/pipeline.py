"""The Grain input pipeline: ArrayRecord pair shards → augmented, batched numpy pairs for one process.

    ArrayRecordDataSource(shards) → tag global index → seed → shuffle → repeat(num_epochs)
      → decode + paired augmentation (random map) → this process's slice [process_index::process_count]
      → to_iter_dataset (threads) → skip bad records → batch → multiprocess prefetch (worker_count > 0)
      → bad-record budget

Each batch is a dict of numpy arrays, V = `data.views` augmented views of each pair:
`image_5x` uint8 `[B, V, 224, 224, 3]`, `tiles_20x` uint8 `[B, V, 16, 224, 224, 3]` (row-major 4x4 tiles of
the 20x field; view v of both is one paired draw), `record_index` int64 `[B]` (global source index: position in
the concatenated, sorted shards). With `teacher_cache` (a `python -m xmag_jax.teacher_cache` directory)
`tiles_20x` is replaced by the cached teacher targets of each view's drawn geometric state: `target_tiles`
float32 `[B, V, 16, Et]` and, when cached, `target_tokens` `[B, V, G, G, Dt]` (`xmag_jax.teacher_cache.reader`).

Everything random is a function of `seed`, the element's position and the view index, so the same seed gives
the same batches, and `get_state()`/`set_state()` of the iterator resume exactly. The processes of a job take
interleaved, disjoint slices of each shuffled epoch; together they read every record once per epoch.
A resume must use the same `worker_count` (Grain slices the stream over its workers before batching; with
a finite `num_epochs` each worker also drops its own last partial batch).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import grain
import jax
from absl import flags

from xmag_jax.data import augment
from xmag_jax.data.bad_records import BadRecordBudgetIterator, BadRecordBudgetIterDataset, SkipBadRecordsIterDataset
from xmag_jax.data.pairs import BadRecordError, DecodeAndAugment, PairSource, TagIndex, decode_images
from xmag_jax.formats import pair_records
from xmag_jax.teacher_cache import reader as teacher_cache_reader

_DATA_KEYS = frozenset(
    {"dir", "split", "worker_count", "prefetch_buffer", "max_bad_record_fraction", "augment", "views",
     "teacher_cache"}
)


def _describe_record(source: grain.sources.ArrayRecordDataSource, index: int) -> str:
    try:
        decode_images(source[index], index)
    except BadRecordError as e:
        return str(e)
    return f"record {index} (decodes now; it failed in a worker)"


def build_dataset(
    data: Mapping[str, Any],
    *,
    seed: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    read_threads: int = 2,
    min_records_checked: int = 1000,
    max_bad_in_a_row: int = 1000,
) -> grain.IterDataset:
    """The pipeline for one process, from the config's `data` section (see configs/debug.py).

    Args:
      data: `dir` (shard directory), `split`, `worker_count` (Grain worker processes; 0 = decode in
        threads of this process), `prefetch_buffer` (batches buffered per worker; it also sizes the
        read-ahead of decoded pairs, `prefetch_buffer * batch_size`), `max_bad_record_fraction`,
        `augment` (`AugmentOptions` fields), `views` (augmented views per pair, default 1), `teacher_cache`
        (optional; "" = batches carry the 20x tiles).
      seed: the pipeline seed (shuffle order and augmentation draws).
      batch_size: pairs per batch in this process (the global batch divided by `process_count`).
      process_index, process_count: this process's slice; default `jax.process_index()/process_count()`.
      num_epochs: passes over the data; None repeats forever.
      read_threads: threads decoding in this process (or in each worker).
      min_records_checked: records seen before the bad-record fraction is enforced.
      max_bad_in_a_row: this many bad records in a row fail at once (a data set without a good record would
        otherwise never yield a batch).
    """
    unknown = sorted(set(data) - _DATA_KEYS)
    if unknown:
        raise ValueError(f"data: unknown keys {unknown}; expected a subset of {sorted(_DATA_KEYS)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 pairs per process, got {batch_size}")
    options = augment.AugmentOptions.from_config(data["augment"])
    views = int(data.get("views", 1))
    if views < 1:
        raise ValueError(f"data.views must be >= 1 augmented views per pair, got {views}")

    source = PairSource(pair_records.shard_paths(data["dir"], data["split"]))
    pair_records.check_field_geometry(data["dir"], data["split"])  # µm/px must be the 4 x 4 field geometry
    if len(source) < process_count * batch_size:
        raise ValueError(
            f"{data['dir']} split {data['split']!r}: {len(source)} records cannot fill a batch of "
            f"{batch_size} in each of {process_count} processes"
        )
    ds = (
        grain.MapDataset.source(source)
        .map_with_index(TagIndex(len(source)))
        .seed(seed)
        .shuffle()
        .repeat(num_epochs)
    )
    # Augment before slicing: each pair's draw follows its position in the global stream, so processes
    # draw independently and a run regrouped onto another process count replays the same draws.
    transform = DecodeAndAugment(options, views)
    if data.get("teacher_cache"):
        transform = teacher_cache_reader.DecodeStudentAndFetchTargets(
            options, teacher_cache_reader.TargetCache(data["teacher_cache"]), views)
    ds = ds.random_map(transform)[process_index::process_count]
    read_ahead = max(1, data["prefetch_buffer"]) * batch_size
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_ahead))
    it = SkipBadRecordsIterDataset(it, max_in_a_row=max_bad_in_a_row).batch(batch_size, drop_remainder=True)
    if data["worker_count"] > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker set-up reads its absl flags; a launcher without absl.app must not fail on that.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data["worker_count"], per_worker_buffer_size=max(1, data["prefetch_buffer"])
            )
        )
    return BadRecordBudgetIterDataset(
        it,
        max_fraction=data["max_bad_record_fraction"],
        min_records=min_records_checked,
        describe=functools.partial(_describe_record, source),
    )


def make_iterator(data: Mapping[str, Any], **kwargs: Any) -> BadRecordBudgetIterator:
    """`iter(build_dataset(data, **kwargs))`: the checkpointable iterator the train loop consumes."""
    return iter(build_dataset(data, **kwargs))
