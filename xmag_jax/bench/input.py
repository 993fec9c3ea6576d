"""`python -m xmag_jax.bench input [--data DIR] [--batch 8] [--workers N] [--steps K] [--json]`

Input pipeline throughput alone (read + JPEG decode + paired augmentation + tile cut + batch), in tile pairs
per second: the whole pipeline (median over K batches after warm-up), the CPU cores it kept busy (CPU
seconds of this process and its worker processes per wall second), hence pairs/s per core; and the
decode+augment work of one pair on one thread, without Grain, in pairs per CPU second of that thread
(independent of other load on the machine). Without `--data`, a temporary directory
of synthetic pair shards is written first (`xmag_jax.data.synthetic_pairs`).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time

import grain
import numpy as np
from absl import flags

from xmag_jax import cli
from xmag_jax import config as schema
from xmag_jax.data import make_iterator
from xmag_jax.data.augment import AugmentOptions
from xmag_jax.data.pairs import DecodeAndAugment
from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.formats import pair_records


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live descendants (Linux /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def _single_thread_pairs_per_s(data_dir: str, split: str, options: AugmentOptions, n: int) -> float:
    source = grain.sources.ArrayRecordDataSource(pair_records.shard_paths(data_dir, split))
    transform = DecodeAndAugment(options)
    raws = [source[i % len(source)] for i in range(n)]
    rng = np.random.default_rng(0)
    times = []
    for i, raw in enumerate(raws):
        start = time.thread_time()
        transform.random_map((i, raw), rng)
        times.append(time.thread_time() - start)
    return 1.0 / statistics.median(times)


def run(data_dir: str, *, split: str, batch: int, workers: int, steps: int, warmup: int, threads: int) -> dict:
    data = copy.deepcopy(schema.base_config().data)
    data.dir, data.split, data.worker_count = data_dir, split, workers
    it = make_iterator(data, seed=0, batch_size=batch, process_index=0, process_count=1, read_threads=threads)
    try:
        for _ in range(warmup):
            next(it)
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - start)
        cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    finally:
        it.close()
    pairs_per_s = batch / statistics.median(times)
    cores_busy = cpu / wall
    return {
        "batch": batch,
        "workers": workers,
        "read_threads": threads,
        "steps": steps,
        "median_batch_s": statistics.median(times),
        "pairs_per_s": pairs_per_s,
        "mean_pairs_per_s": batch * steps / wall,
        "cores_busy": cores_busy,
        "pairs_per_s_per_core": batch * steps / cpu,
        "single_thread_decode_augment_pairs_per_s": _single_thread_pairs_per_s(
            data_dir, split, AugmentOptions.from_config(data.augment), n=max(8, 2 * batch)
        ),
        "cpu_count": os.cpu_count(),
    }


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data", None, "pair shard directory (default: write synthetic shards to a temp dir)",
                        flag_values=fv)
    flags.DEFINE_string("split", "train", "shard split of --data", flag_values=fv)
    flags.DEFINE_integer("batch", 8, "pairs per batch", flag_values=fv)
    flags.DEFINE_integer("workers", 0, "Grain worker processes (0 = threads in-process)", flag_values=fv)
    flags.DEFINE_integer("threads", 2, "decode threads per process", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "timed batches", flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "untimed batches first", flag_values=fv)
    flags.DEFINE_integer("records", 64, "synthetic pairs to write without --data", flag_values=fv)
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)


COMMAND = cli.Command("python -m xmag_jax.bench input", _define, doc=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)

    with tempfile.TemporaryDirectory(prefix="xmag_input_bench_") as tmp:
        data_dir = args.data
        if data_dir is None:
            data_dir = tmp
            write_pair_shards(tmp, args.records, num_shards=2, split=args.split)
        result = run(data_dir, split=args.split, batch=args.batch, workers=args.workers, steps=args.steps,
                     warmup=args.warmup, threads=args.threads)
    result["data"] = args.data or f"synthetic ({args.records} pairs)"
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"input pipeline: {result['pairs_per_s']:.1f} pairs/s "
            f"(median batch {result['median_batch_s'] * 1e3:.0f} ms, "
            f"batch {args.batch}, workers {args.workers}, threads {args.threads}, {args.steps} batches, "
            f"data {result['data']})\n"
            f"  cores busy {result['cores_busy']:.2f} of {result['cpu_count']}: "
            f"{result['pairs_per_s_per_core']:.1f} pairs/s per core\n"
            f"  decode+augment alone, one thread: "
            f"{result['single_thread_decode_augment_pairs_per_s']:.1f} pairs per CPU s"
        )
    return 0
