"""Benchmark `python -m xmag_jax.bench prep` (or `python -m data_prep.bench`): tile-pair throughput per core.

Runs the whole `data_prep.tile_pairs` job (tissue mask, pairs, records, per-slide shards, TFDS assembly,
Beam) in this process (DirectRunner in_memory, 1 worker, --noisolation so all CPU time is counted here)
and then, on exactly the same fields, the bare minimum: OpenSlide `read_region` of the 5x and 20x fields
at the level the reader picks + JPEG encode of what was read. Prints pairs per CPU-second for both and
their ratio (goal ≤ 1.3x).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import tempfile
import time

import numpy as np
import openslide
import simplejpeg
from absl import flags

from data_prep import tile_pairs
from xmag_jax import cli, errors
from xmag_jax.formats import pair_records
from xmag_jax.wsi import slide_reader, synthetic


def _bare_cost(slides_dir: str, pairs: list[dict], quality: int) -> dict[str, tuple[float, int]]:
    """{scan kind: (CPU seconds, pairs)} of read_region + JPEG encode of each pair's two fields, as read."""
    by_slide = collections.defaultdict(list)
    for p in pairs:
        by_slide[p["slide_id"]].append(p)
    paths = {slide_reader.slide_id_of(n): os.path.join(slides_dir, n) for n in os.listdir(slides_dir)}
    cost: dict[str, tuple[float, int]] = {}
    for slide_id, items in sorted(by_slide.items()):
        handle = openslide.OpenSlide(paths[slide_id])
        mpp0 = float(handle.properties["openslide.mpp-x"])
        kind = f"{mpp0:g} µm/px scan"
        start = time.process_time()
        for p in items:
            field = p["mpp_5x"] * pair_records.TILE_5X_PX / mpp0
            for out_px in (pair_records.TILE_5X_PX, pair_records.REGION_20X_PX):
                level = slide_reader.best_level(handle.level_downsamples, field / out_px)
                size = int(np.ceil(field / handle.level_downsamples[level] - 1e-6))
                region = np.asarray(handle.read_region((p["x"], p["y"]), level, (size, size)))
                simplejpeg.encode_jpeg(region, quality=quality, colorspace="RGBX", colorsubsampling="420")
        seconds, count = cost.get(kind, (0.0, 0))
        cost[kind] = (seconds + time.process_time() - start, count + len(items))
        handle.close()
    return cost


def _read_all(out: str) -> list[dict]:
    from array_record.python import array_record_module

    pairs = []
    for split in ("train", "val"):
        for path in pair_records.shard_paths(out, split):
            reader = array_record_module.ArrayRecordReader(path)
            pairs += [pair_records.decode_pair(r) for r in reader.read_all()]
            reader.close()
    return pairs


PROG = "python -m xmag_jax.bench prep"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("slides", None, "folder of slides (default: 2 synthetic slides, one 40x SVS, one 20x TIFF)",
                        flag_values=fv)
    flags.DEFINE_integer("size", 2 * synthetic.DEFAULT_SIZE_PX, "side of the synthetic slides, px at 0.25 µm/px",
                         flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of both images (1..100)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if args.slides is not None and not os.path.isdir(args.slides):
        raise errors.UserError(f"--slides {args.slides}: expected a folder of slides")
    if args.size < synthetic.TILE_PX * synthetic.DOWNSAMPLES[-1]:
        raise errors.UserError(
            f"--size {args.size}: expected at least {synthetic.TILE_PX * synthetic.DOWNSAMPLES[-1]} px")
    if not 1 <= args.jpeg_quality <= 100:
        raise errors.UserError(f"--jpeg_quality {args.jpeg_quality}: expected a JPEG quality in 1..100")
    with tempfile.TemporaryDirectory(prefix="xmag_prep_bench_") as tmp:
        slides = args.slides
        if slides is None:
            slides = os.path.join(tmp, "slides")
            synthetic.write_dataset(slides, 2, args.size, seed=0)
        out = os.path.join(tmp, "pairs")
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            tile_pairs.main(["--slides", slides, "--out", out, "--val_fraction", "0.5", "--jpeg_quality",
                             str(args.jpeg_quality), "--noprogress", "--noisolation",
                             "--direct_running_mode=in_memory", "--direct_num_workers=1"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        pairs = _read_all(out)
        bare = _bare_cost(slides, pairs, args.jpeg_quality)
    n = len(pairs)
    bare_total = sum(seconds for seconds, _ in bare.values())
    print(f"prep: {n} pairs from {len({p['slide_id'] for p in pairs})} slides, {os.cpu_count()} cores on this machine")
    print(f"prep: tile_pairs (tissue + pairs + records + shards + TFDS metadata + Beam, 1 worker): "
          f"{n / cpu:.2f} pairs/s per core ({cpu:.2f} CPU s, {wall:.2f} wall s)")
    for kind, (seconds, count) in sorted(bare.items()):
        print(f"prep: bare read_region + JPEG encode, {kind}: {count / seconds:.2f} pairs/s per core ({count} pairs)")
    print(f"prep: bare read_region + JPEG encode of the same fields: {n / bare_total:.2f} pairs/s per core "
          f"({bare_total:.2f} CPU s)")
    print(f"prep: overhead ratio tile_pairs / bare = {cpu / bare_total:.2f}x (goal <= 1.3x)")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
