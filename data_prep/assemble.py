"""Per-slide shards -> TFDS-named split shards + `dataset_info.json`/`features.json`, published atomically.

Everything is first written to a staging folder inside the output folder, then published with
`atomic.publish`: the old dataset's `dataset_info.json` is removed, old shards removed, new shards moved in,
and `dataset_info.json` moved in last. A dataset folder holding `dataset_info.json` is therefore always
complete, and `pair_records.shard_paths` refuses a partial shard set.
"""

from __future__ import annotations

import math
import os
import re

import tensorflow_datasets as tfds
from array_record.python import array_record_module

from xmag_jax import atomic
from xmag_jax.formats import pair_records

READ_CHUNK = 64
METADATA_FILES = ("features.json", "dataset_info.json")


def _count(path: str) -> int:
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _write_split(stage: str, split: str, slide_shards: list[str], examples_per_shard: int, dataset_name: str
                 ) -> tfds.core.SplitInfo:
    counts = [_count(p) for p in slide_shards]
    total = sum(counts)
    num_shards = max(1, math.ceil(total / examples_per_shard))
    bounds = [total * i // num_shards for i in range(num_shards + 1)]
    lengths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    sources = ((p, n) for p, n in zip(slide_shards, counts) if n)
    num_bytes = 0
    current, left = None, 0
    for index, length in enumerate(lengths):
        path = os.path.join(stage, pair_records.shard_name(split, index, num_shards, dataset_name))
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        written = 0
        while written < length:
            if left == 0:
                if current is not None:
                    current.close()
                source, left = next(sources)
                current, offset = array_record_module.ArrayRecordReader(source), 0
            take = min(left, length - written, READ_CHUNK)
            for record in current.read(offset, offset + take):
                writer.write(record)
            offset, left, written = offset + take, left - take, written + take
        writer.close()
        num_bytes += os.path.getsize(path)
    if current is not None:
        current.close()
    return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=None)


def _old_dataset_files(out_dir: str, dataset_name: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(dataset_name)}-[a-z0-9_]+\.{pair_records.FILE_FORMAT}-\d{{5}}-of-\d{{5}}$")
    return [n for n in os.listdir(out_dir) if pattern.match(n)]


def assemble(out_dir: str, split_shards: dict[str, list[str]], examples_per_shard: int, description: str = "",
             metadata: dict | None = None, *, dataset_name: str = pair_records.DATASET_NAME,
             features: tfds.features.FeaturesDict | None = None) -> dict[str, int]:
    """Write the TFDS dataset for {split: [per-slide shard paths]} into `out_dir`; returns {split: examples}.
    Records keep the order of the per-slide shards. `metadata` (JSON-able) becomes the TFDS `metadata.json`
    (`pair_records.read_metadata`); `dataset_name`/`features`: the shard names and record schema (default: pairs)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic.publish(out_dir, marker="dataset_info.json", stale=_old_dataset_files(out_dir, dataset_name)) as stage:
        split_infos = [_write_split(os.fspath(stage), split, shards, examples_per_shard, dataset_name)
                       for split, shards in sorted(split_shards.items()) if shards]
        split_infos = [s for s in split_infos if s.num_examples]
        if not split_infos:
            raise ValueError("no records to write: every slide failed or had no tissue tile")
        for path in stage.iterdir():  # splits without examples leave an empty shard 0-of-1: drop it
            if not any(path.name.startswith(f"{dataset_name}-{s.name}.") for s in split_infos):
                path.unlink()
        tfds.folder_dataset.write_metadata(data_dir=stage, features=features or pair_records.features(),
                                           split_infos=split_infos,
                                           check_data=False, description=description,
                                           metadata=tfds.core.MetadataDict(metadata or {}))
    return {s.name: s.num_examples for s in split_infos}
