"""Writes a teacher-target cache: the config's teacher over the config's pair split, every pair under every
geometric state of the config's augmentation, exactly the targets the loss uses (`Trainer.teacher_targets`).

The teacher runs as in training (`teacher.dtype`, `teacher.sharding`, the config's mesh); each process
writes the cache shards of its source shards (`i % process_count == process_index`), all processes step
the sharded forward in lockstep. A shard is written under a temporary name, renamed when complete, then
vouched for by `work/SHARD.done.json` (spec digest, size and `atomic.file_digest`); a rerun
skips the shards whose marker still matches, so a killed job resumes. `dataset_info.json` is moved in last:
a directory holding it is a finished cache.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from tqdm import tqdm

from xmag_jax import atomic, encoders, errors, geometry, sharding, workdir_lock
from xmag_jax.data import augment, pairs
from xmag_jax.distill import config_validation
from xmag_jax.distill import step as step_lib
from xmag_jax.formats import pair_records
from xmag_jax.teacher_cache import reader, records, spec


def _put(host_tree: Any, shardings: Any) -> Any:
    """Host arrays → global arrays on `shardings` (each process places its addressable shards)."""
    def put(x, s):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    return jax.tree.map(put, host_tree, shardings)


def _done_ok(cache_dir: str, shard: str, digest: str) -> dict | None:
    """The shard's done marker if it is for `digest` and the shard is still what it vouches for."""
    try:
        with open(records.done_path(cache_dir, shard)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if done.get("spec_digest") != digest:
        return None
    try:
        if (os.path.getsize(shard), atomic.file_digest(shard)) != (done.get("num_bytes"), done.get("digest")):
            return None
    except OSError:
        return None
    return done


def _refuse_other_cache(cache_dir: str, digest: str, meta: dict[str, Any]) -> None:
    """UserError when `cache_dir` already holds (part of) a cache of another config or teacher."""
    try:
        existing = records.read_metadata(cache_dir)
    except records.CacheError:
        existing = None
    if existing is not None and records.spec_digest(existing) != digest:
        diff = sorted(k for k in set(existing) | set(meta)
                      if k not in records.COUNTS and existing.get(k) != meta.get(k))
        raise errors.UserError(f"--out {cache_dir}: holds a teacher-target cache of another config (differs in "
                               f"{', '.join(diff)}); choose another --out or delete it")


class _Forward:
    """The jitted teacher targets of a global batch of fields, returned as this process's rows (numpy)."""

    def __init__(self, trainer: step_lib.Trainer, teacher: Any):
        self.mesh, self.teacher = trainer.mesh, teacher
        self.in_sharding = sharding.batch_sharding(trainer.mesh, 5)

        def fn(params, tiles):
            t = trainer.teacher_targets(params, tiles)
            return t.tiles, t.tokens

        self._fn = jax.jit(fn, in_shardings=(trainer.teacher_shardings, self.in_sharding))

    def __call__(self, local_tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        tiles = jax.make_array_from_process_local_data(self.in_sharding, local_tiles)
        out = self._fn(self.teacher, tiles)
        if jax.process_count() > 1:
            specs = jax.tree.map(lambda x: x.sharding.spec, out)
            out = multihost_utils.global_array_to_host_local_array(out, self.mesh, specs)
        return jax.tree.map(np.asarray, out)


def _decode(source: pairs.PairSource, index: int, offset: int) -> tuple[np.ndarray | None, str]:
    """(`image_20x [896, 896, 3]` or None, the reason it is bad) of the pair at global `index`."""
    try:
        return pairs.decode_images(source[index - offset], index)[1], ""
    except pairs.BadRecordError as e:
        return None, str(e)


def write(config: ml_collections.ConfigDict, out: str, *, dtype: str = "float32", batch: int | None = None,
          read_threads: int = 4, progress: bool = True) -> dict[str, Any]:
    """Writes (or resumes) the cache of `config` into `out`; returns the summary (also printed by the CLI).

    `batch`: fields (pair x state) per global forward, default `config.batch_size`; it must divide by the
    data-parallel size and the process count. Raises UserError for bad input.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise errors.UserError(f"--out {out}: expected a cache directory, this is a file")
    if dtype not in records.DTYPES:
        raise errors.UserError(f"--dtype {dtype}: expected one of {sorted(records.DTYPES)}")
    live = spec.live_config(config)
    config_validation.check_config(live)
    mesh = sharding.make_mesh(live.mesh)
    config_validation.check_against_mesh(live, mesh)
    trainer = step_lib.make_trainer(live, mesh)
    batch = int(live.batch_size if batch is None else batch)
    unit = sharding.data_parallel_size(mesh) * jax.process_count()
    if batch < 1 or batch % unit:
        raise errors.UserError(f"--batch {batch}: must be a positive multiple of {unit} (data-parallel size x "
                               "processes)")
    local_batch = batch // jax.process_count()
    states = spec.needed_states(live)
    host_params = spec.teacher_params_on_host(live)
    meta = spec.expected_metadata(live, weights_fingerprint=encoders.params_fingerprint(host_params), dtype=dtype)
    digest = records.spec_digest(meta)
    codec = records.RecordCodec(meta["targets"])
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, records.WORK_DIR), exist_ok=True)
    _refuse_other_cache(out, digest, meta)
    with workdir_lock.hold(out, job="teacher_cache", process_index=jax.process_index()):
        return _write_locked(live, out, trainer, _put(host_params, trainer.teacher_shardings), meta, digest, codec,
                             states, local_batch, read_threads, progress)


def _write_locked(config, out: str, trainer: step_lib.Trainer, teacher: Any, meta: dict, digest: str,
                  codec: records.RecordCodec, states: tuple[int, ...], local_batch: int, read_threads: int,
                  progress: bool) -> dict[str, Any]:
    start = time.time()
    split = config.data.split
    sources = pair_records.shard_paths(config.data.dir, split)
    lengths = [reader.num_records(p, "pair shard", "re-run `python -m data_prep.tile_pairs`") for p in sources]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    targets = records.shard_paths(out, split, len(sources))
    mine = [i for i in range(len(sources)) if i % jax.process_count() == jax.process_index()]
    todo = [i for i in mine if _done_ok(out, targets[i], digest) is None]
    if todo and os.path.exists(os.path.join(out, "dataset_info.json")):
        os.remove(os.path.join(out, "dataset_info.json"))  # the cache is incomplete until rewritten
    atomic.remove_leftovers(out)  # left by a killed run
    pairs_per_chunk = max(1, local_batch // len(states))
    chunks = sum(math.ceil(lengths[i] / pairs_per_chunk) for i in todo)
    if jax.process_count() > 1:
        chunks_all = int(np.max(multihost_utils.process_allgather(np.asarray(chunks))))
    else:
        chunks_all = chunks
    forward = _Forward(trainer, teacher)
    bad = 0
    bar = tqdm(total=sum(lengths[i] for i in todo), unit="pair", desc="teacher targets",
               disable=not progress or jax.process_index() != 0)
    pool = concurrent.futures.ThreadPoolExecutor(read_threads)
    runner = _ChunkRunner(forward, codec, states, local_batch)
    try:
        for i in todo:
            source = pairs.PairSource([sources[i]])
            shard_bad = 0
            with atomic.target(targets[i]) as tmp:
                writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
                try:
                    for lo in range(0, lengths[i], pairs_per_chunk):
                        indices = range(offsets[i] + lo, offsets[i] + min(lo + pairs_per_chunk, lengths[i]))
                        decoded = list(pool.map(
                            lambda g, source=source, offset=offsets[i]: _decode(source, g, offset), indices))
                        for rec in runner.run(list(indices), decoded):
                            writer.write(rec)
                        shard_bad += sum(1 for image, _ in decoded if image is None)
                        bar.update(len(indices))
                        bar.set_postfix(bad=bad + shard_bad)
                finally:
                    writer.close()
            bad += shard_bad
            atomic.write_json(records.done_path(out, targets[i]), {
                "spec_digest": digest, "num_bytes": os.path.getsize(targets[i]),
                "digest": atomic.file_digest(targets[i]), "num_pairs": lengths[i], "bad_pairs": shard_bad,
                "source_shard": os.path.basename(sources[i])})
        for _ in range(chunks_all - chunks):  # keep the sharded forward in lockstep with the other processes
            runner.run([], [])
    finally:
        bar.close()
        pool.shutdown()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("xmag_teacher_cache_written")
    summary = {"cache": out, "pairs": int(sum(lengths)), "states": list(states), "pairs_written_now": int(
        sum(lengths[i] for i in todo)), "bad_pairs_now": bad, "seconds": round(time.time() - start, 2)}
    if jax.process_index() == 0:
        summary.update(_publish(config, out, meta, digest, targets, lengths))
    summary["pairs_per_s_now"] = round(summary["pairs_written_now"] / max(summary["seconds"], 1e-9), 2)
    return summary


class _ChunkRunner:
    """Turns a chunk of decoded pairs into their cache records, in order (pair-major, state-minor); runs a
    fixed number of forwards per chunk size so that every process makes the same calls."""

    def __init__(self, forward: _Forward, codec: records.RecordCodec, states: tuple[int, ...], local_batch: int):
        self.forward, self.codec, self.states, self.local_batch = forward, codec, states, local_batch
        self.calls = math.ceil(max(1, local_batch // len(states)) * len(states) / local_batch)

    def _fields(self, decoded: list[tuple[np.ndarray | None, str]]) -> Iterator[np.ndarray]:
        for image, _ in decoded:
            for d4 in self.states:
                yield None if image is None else pairs.cut_tiles(augment.apply_d4(image, d4))

    def run(self, indices: list[int], decoded: list[tuple[np.ndarray | None, str]]) -> list[bytes]:
        fields = list(self._fields(decoded))
        tiles_out, tokens_out = [], []
        for c in range(self.calls):
            part = fields[c * self.local_batch:(c + 1) * self.local_batch]
            x = np.zeros((self.local_batch, geometry.FIELD_TILES, geometry.TILE_PX, geometry.TILE_PX, 3), np.uint8)
            for k, tiles in enumerate(part):
                if tiles is not None:
                    x[k] = tiles
            t, tok = self.forward(x)
            tiles_out.append(t[:len(part)])
            tokens_out.append(None if tok is None else tok[:len(part)])
        if not indices:
            return []
        tiles_all = np.concatenate(tiles_out)
        tokens_all = None if tokens_out[0] is None else np.concatenate(tokens_out)
        out, k = [], 0
        for index, (image, reason) in zip(indices, decoded):
            for d4 in self.states:
                tok = None if tokens_all is None else tokens_all[k]
                if image is None:
                    out.append(self.codec.encode(index, d4, np.zeros_like(tiles_all[k]),
                                                 None if tok is None else np.zeros_like(tok), error=reason))
                else:
                    out.append(self.codec.encode(index, d4, tiles_all[k], tok))
                k += 1
        return out


def _publish(config, out: str, meta: dict, digest: str, targets: list[str], lengths: list[int]) -> dict[str, Any]:
    """Checks every shard's done marker, then writes the TFDS metadata (dataset_info.json last)."""
    dones = [_done_ok(out, t, digest) for t in targets]
    missing = [os.path.basename(t) for t, d in zip(targets, dones) if d is None]
    if missing:
        raise errors.UserError(f"--out {out}: shards {missing} are not finished (another process failed?); rerun "
                               "with the same options to finish them")
    bad = sum(d["bad_pairs"] for d in dones)
    total = int(sum(lengths))
    if bad > config.data.max_bad_record_fraction * total:
        raise errors.UserError(f"{bad} of {total} source records of {config.data.dir} are bad, more than "
                               f"data.max_bad_record_fraction {config.data.max_bad_record_fraction}; the cache "
                               f"{out} is left unfinished (no dataset_info.json)")
    full = {**meta, "num_pairs": total, "bad_pairs": bad, "shard_lengths": [int(n) for n in lengths]}
    states = len(meta["states"])
    split = tfds.core.SplitInfo(name=config.data.split, shard_lengths=[n * states for n in lengths],
                                num_bytes=sum(os.path.getsize(t) for t in targets), filename_template=None)
    with atomic.publish(out, marker="dataset_info.json") as stage:
        links = [stage / os.path.basename(path) for path in targets]
        for link, path in zip(links, targets):  # TFDS reads the shard names from its data_dir
            os.symlink(path, link)
        t = meta["targets"]
        tfds.folder_dataset.write_metadata(
            data_dir=stage, features=records.features(t["embed_dim"], t["token_grid"], t["token_dim"], t["dtype"]),
            split_infos=[split], check_data=False, metadata=tfds.core.MetadataDict(full),
            description=f"teacher targets of {meta['teacher']['name']} over {meta['source']['dir']} split "
                        f"{config.data.split}, written by xmag_jax.teacher_cache")
        for link in links:  # the shards are in place already: publish only the metadata
            link.unlink()
    return {"bad_pairs": bad, "cache_bytes": int(split.num_bytes)}
