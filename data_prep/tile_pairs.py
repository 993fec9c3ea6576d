"""Whole-slide images -> aligned 5x/20x tile pairs -> ArrayRecord shards with TFDS metadata (Apache Beam).

For every slide: find the tissue, lay a grid of 5x tiles (224 px at --mpp_5x µm/px, i.e. 448 µm at 2.0
µm/px), keep tiles with enough tissue, and store each with the 20x image of exactly the same field
(896 px at --mpp_20x µm/px = 4 x 4 tiles of 224 px). Pixel sizes come from the slide file (or the CSV
`mpp` column), never from the "magnification" label.

The 5x tile is read from the slide's pyramid at --mpp_5x (default, --low_mag_source pyramid) or, as XMAG's
released code does, made by Lanczos-resizing the 896 px 20x region to 224 px (--low_mag_source resize).
--mpp_5x / --mpp_20x must be 4 (the 4 x 4 field geometry). A slide scanned coarser than the 20x target (beyond
--mpp_tolerance) fails with ResolutionError rather than being upsampled, unless --allow_upsample.

Output folder (pass it as the data dir to Grain / tfds.builder_from_directory):
  xmag_pairs-train.array_record-00000-of-0000N ...   the pairs, TFDS shard names
  xmag_pairs-val.array_record-00000-of-0000M ...
  dataset_info.json, features.json                  TFDS metadata (splits, example counts, features)
  metadata.json                                     µm/px targets, 5x source, resampling (training checks it)
  slides.csv                                        slide_id, split, pairs, level-0 µm/px, path
  summary.json, failures.jsonl                      what happened; one JSON line per failed slide
  overlays/SLIDE.png                                thumbnail + tissue (green) + kept tiles (blue)
  work/                                             per-slide shards and done markers (resume state)

A rerun with the same options skips slides already done (a shard that no longer matches its done marker's
size and digest is tiled again, with a warning); a failed slide is retried. Slides that fail (not a slide,
truncated, no pixel size, unreadable region, too coarse) are listed in failures.jsonl; the job fails when more
than --max_failure_fraction of the slides failed. Splits are drawn among the slides that produced pairs; a job
left without a `train` split fails. One job at a time per --out (a lock file names the holder).

Any other option is an Apache Beam pipeline option, e.g. `--runner DataflowRunner --project P ...`;
by default the local DirectRunner uses one process per CPU core (`--direct_num_workers N` to change).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from absl import flags
from tqdm import tqdm

# apache_beam logs on import that its optional BigQuery client is absent: noise on every command line here.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from data_prep import assemble, pairs  # noqa: E402
from xmag_jax import atomic, cli, errors, geometry, workdir_lock  # noqa: E402
from xmag_jax.formats import pair_records  # noqa: E402
from xmag_jax.wsi import failures, inputs, isolation, tissue  # noqa: E402

PROG = "python -m data_prep.tile_pairs"
READER_ADVICE = ("run fewer Beam workers per machine (--direct_num_workers, a larger machine type) or give them "
                 "more memory")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlideToPairs(beam.DoFn):
    """Beam stage: one slide spec in, its done marker or failure record out (work in a child process,
    `xmag_jax.wsi.isolation.SlideProcess`: a fault signal there fails the slide, a kill from outside reruns it).

    `process(spec, config, work_dir, overlay_dir)` does one slide (`pairs.process_slide`; tile_bags passes
    its own); it must be a module-level function (pickled to the workers)."""

    def __init__(self, config, work_dir: str, overlay_dir: str | None, isolate: bool = True,
                 process: Callable[..., dict] = pairs.process_slide):
        self._config, self._work_dir, self._overlay_dir, self._isolate = config, work_dir, overlay_dir, isolate
        self._process = process
        self._child: isolation.SlideProcess | None = None

    def setup(self):
        self._child = isolation.SlideProcess(READER_ADVICE) if self._isolate else None

    def process(self, spec: inputs.SlideSpec):
        args = (spec, self._config, self._work_dir, self._overlay_dir)
        result = self._process(*args) if self._child is None else self._child.run(self._process, *args)
        yield pairs.write_failed(self._work_dir, result) if isinstance(result, failures.Failure) else result

    def teardown(self):
        if self._child is not None:
            self._child.close()


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("slides", None, "folder of slides (.svs .tif .tiff .ndpi .mrxs .scn ...) or a CSV "
                        "manifest with columns path [, slide_id, mpp, split, coords]", flag_values=fv)
    flags.DEFINE_string("out", None, "output dataset folder", flag_values=fv)
    # magnification (pixel sizes in µm/px)
    flags.DEFINE_float("mpp_5x", geometry.MPP_5X, "µm/px of the 224 px low-magnification tile", flag_values=fv)
    flags.DEFINE_float("mpp_20x", geometry.MPP_20X, "µm/px of the 896 px high-magnification region", flag_values=fv)
    flags.DEFINE_float("mpp_tolerance", 0.1, "a slide scanned up to this fraction coarser than --mpp_20x "
                       "is still used, slightly upsampled (0.1 = 10%)", flag_values=fv)
    flags.DEFINE_bool("allow_upsample", False, "tile slides scanned coarser than the 20x target too (their "
                      "20x regions upsampled); without it they fail with ResolutionError", flag_values=fv)
    flags.DEFINE_enum("resample", "area", ["area", "lanczos"], "filter from the pyramid level to the target µm/px",
                      flag_values=fv)
    flags.DEFINE_enum("low_mag_source", "pyramid", list(pair_records.LOW_MAG_SOURCES), "the 5x tile: 'pyramid' "
                      "reads the slide at --mpp_5x; 'resize' Lanczos-resizes the 896 px 20x region to 224 px, as "
                      "XMAG's released code does", flag_values=fv)
    # tissue
    flags.DEFINE_float("min_tissue", 0.25, "keep 5x tiles whose field is at least this fraction tissue",
                       flag_values=fv)
    flags.DEFINE_string("coords_dir", None, "use TRIDENT/CLAM patch-coordinate h5 files (SLIDE.h5 or "
                        "SLIDE_patches.h5) from this folder instead of tissue detection (also: CSV `coords` column)",
                        flag_values=fv)
    flags.DEFINE_float("thumbnail_mpp", tissue.THUMBNAIL_MPP, "µm/px of the tissue mask", flag_values=fv)
    # records and splits
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of both images (1..100)", flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, "fraction of slides (not tiles) held out as the `val` split "
                       "when the CSV has no `split` column", flag_values=fv)
    flags.DEFINE_integer("split_seed", 0, "seed of the slide-level split", flag_values=fv)
    flags.DEFINE_integer("examples_per_shard", 2000, "pairs per output shard (2000 ≈ 0.4 GB)", flag_values=fv)
    define_job_flags(fv)


def define_job_flags(fv: flags.FlagValues) -> None:
    """The failure budget, progress and crash-isolation flags of the Beam tiling jobs (tile_pairs, tile_bags)."""
    flags.DEFINE_float("max_failure_fraction", 0.1, "fail the job when more than this fraction of slides "
                       "failed", flag_values=fv)
    flags.DEFINE_bool("progress", True, "progress bars (--noprogress: none)", flag_values=fv)
    flags.DEFINE_bool("isolation", True, "read each slide in a child process, so a crashing decoder fails "
                      "that slide only (--noisolation: in the Beam worker itself; a crash then stops the job)",
                      flag_values=fv)

COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("slides", "out"), pass_through=True,
                      positional="[Beam pipeline options]")


def check_args(args: flags.FlagValues) -> None:
    """Raises UserError (one line) for option values no job can run with; before anything is read."""
    def need(ok: bool, flag: str, expected: str, value) -> None:
        if not ok:
            raise errors.UserError(f"{flag} {value}: expected {expected}")

    need(not os.path.exists(args.out) or os.path.isdir(args.out), "--out", "a folder (this is a file)", args.out)
    for flag in ("mpp_5x", "mpp_20x", "thumbnail_mpp"):
        need(getattr(args, flag) > 0, f"--{flag}", "a pixel size > 0 µm/px", getattr(args, flag))
    pair_records.check_ratio(args.mpp_5x, args.mpp_20x, "--mpp_5x / --mpp_20x")
    need(args.mpp_tolerance >= 0, "--mpp_tolerance", "a fraction >= 0", args.mpp_tolerance)
    need(0 <= args.min_tissue <= 1, "--min_tissue", "a fraction in [0, 1]", args.min_tissue)
    need(1 <= args.jpeg_quality <= 100, "--jpeg_quality", "a JPEG quality in 1..100", args.jpeg_quality)
    need(0 <= args.val_fraction < 1, "--val_fraction", "a fraction in [0, 1)", args.val_fraction)
    need(args.examples_per_shard >= 1, "--examples_per_shard", "at least 1 pair per shard", args.examples_per_shard)
    need(0 <= args.max_failure_fraction <= 1, "--max_failure_fraction", "a fraction in [0, 1]",
         args.max_failure_fraction)


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options as given; without --runner: DirectRunner, one worker process per core."""
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", *beam_args]
        if not any(a.startswith("--direct_num_workers") for a in beam_args):
            beam_args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args = [*beam_args, "--default_sdk_harness_log_level=WARNING"]
    options = PipelineOptions(beam_args)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        raise inputs.ManifestError(f"unknown option(s) {sorted(unknown)}: neither a tile_pairs option (see --help) "
                                   f"nor an Apache Beam pipeline option")
    return options


def _watch_progress(work_dir: str, todo: list[inputs.SlideSpec], stop: threading.Event, enabled: bool) -> None:
    names = {s.slide_id for s in todo}
    with tqdm(total=len(todo), desc="slides", unit="slide", disable=not enabled) as bar:
        while True:
            finished = stop.wait(1.0)
            done = sum(os.path.exists(pairs.done_path(work_dir, n)) or os.path.exists(pairs.failed_path(work_dir, n))
                       for n in names)
            bar.update(done - bar.n)
            if finished:
                return


def run_pipeline(todo: list[inputs.SlideSpec], config, work_dir: str, overlay_dir: str | None,
                 options: PipelineOptions, isolate: bool = True,
                 process: Callable[..., dict] = pairs.process_slide) -> None:
    """Tile `todo` slides with Beam, one slide per element (`process`: see `SlideToPairs`)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(work_dir, todo, stop, config.progress), daemon=True)
    watcher.start()
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline | "Slides" >> beam.Create(todo) | "OnePerWorker" >> beam.Reshuffle()
                 | "TileSlides" >> beam.ParDo(SlideToPairs(config, work_dir, overlay_dir, isolate, process)))
    finally:
        stop.set()
        watcher.join()


def clean_stale_temps(out_dir: str, work_dir: str) -> None:
    atomic.remove_leftovers(work_dir)
    atomic.remove_leftovers(out_dir)


def collect_results(specs: list[inputs.SlideSpec], config, out_dir: str, work_dir: str
                    ) -> tuple[dict[str, dict | None], list[failures.Failure]]:
    """({slide_id: done marker or None}, failures) after a pipeline run; writes `out_dir/failures.jsonl`
    (a slide with neither marker is a `failures.NO_RESULT`)."""
    done = {s.slide_id: pairs.read_done(work_dir, s, config) for s in specs}
    failed = [pairs.read_failed(work_dir, s) or failures.Failure.kind(
                  s, failures.NO_RESULT, "no result: the worker died on this slide (run without --noisolation?)")
              for s in specs if done[s.slide_id] is None]
    failures.write_failures(out_dir, failed)
    return done, failed


def run(args: flags.FlagValues, beam_args: list[str]) -> dict:
    """Tile, assemble and report; returns the summary. Raises SystemExit past --max_failure_fraction or
    without a train split, `workdir_lock.WorkdirLocked` while another job works on --out."""
    check_args(args)
    options = pipeline_options(beam_args)
    out_dir = os.path.abspath(args.out)
    specs = inputs.list_slides(args.slides, args.coords_dir)
    with workdir_lock.hold(out_dir, job="tile_pairs"):
        return _run_locked(args, options, out_dir, specs)


def _run_locked(args: flags.FlagValues, options: PipelineOptions, out_dir: str, specs: list[inputs.SlideSpec]
                ) -> dict:
    start = time.time()
    work_dir, overlay_dir = os.path.join(out_dir, "work"), os.path.join(out_dir, "overlays")
    os.makedirs(work_dir, exist_ok=True)
    clean_stale_temps(out_dir, work_dir)
    config = pairs.PairConfig(mpp_5x=args.mpp_5x, mpp_20x=args.mpp_20x, mpp_tolerance=args.mpp_tolerance,
                              allow_upsample=args.allow_upsample, low_mag_source=args.low_mag_source,
                              min_tissue=args.min_tissue, jpeg_quality=args.jpeg_quality, resample=args.resample,
                              thumb_mpp=args.thumbnail_mpp, progress=args.progress)
    already = {s.slide_id for s in specs if pairs.read_done(work_dir, s, config)}
    todo = [s for s in specs if s.slide_id not in already]
    if todo:
        run_pipeline(todo, config, work_dir, overlay_dir, options, args.isolation)
    done, failed = collect_results(specs, config, out_dir, work_dir)
    productive = [s for s in specs if done[s.slide_id] and done[s.slide_id]["num_pairs"] > 0]
    splits = inputs.assign_splits(productive, args.val_fraction, args.split_seed)
    summary = {
        "slides": len(specs), "skipped_already_done": len(already), "tiled_now": len(todo) - len(failed),
        "failed": len(failed), "failures_by_type": failures.count_by_type(failed), "pairs": {},
        "slides_per_split": {},
        "slides_without_tissue": sorted(k for k, d in done.items() if d and d["num_pairs"] == 0),
    }
    summary_path = os.path.join(out_dir, "summary.json")
    if failed and len(failed) > args.max_failure_fraction * len(specs):
        summary["seconds"] = round(time.time() - start, 2)
        atomic.write_json(summary_path, summary)
        raise SystemExit(f"FAILED: {len(failed)} of {len(specs)} slides failed "
                         f"({summary['failures_by_type']}), more than --max_failure_fraction "
                         f"{args.max_failure_fraction}; see {os.path.join(out_dir, failures.FAILURES_FILE)}. "
                         f"Fix or remove them and rerun: finished slides are kept.")
    split_shards: dict[str, list[str]] = {}
    for spec in productive:
        split_shards.setdefault(splits[spec.slide_id], []).append(pairs.shard_path(work_dir, spec.slide_id))
    summary["slides_per_split"] = {k: len(v) for k, v in sorted(split_shards.items())}
    if "train" not in split_shards:
        summary["seconds"] = round(time.time() - start, 2)
        atomic.write_json(summary_path, summary)
        raise SystemExit(f"FAILED: no train split: {len(productive)} of {len(specs)} slides produced pairs, split "
                         f"{summary['slides_per_split'] or 'none'}; see {summary_path}. Add slides, lower "
                         f"--val_fraction or fix the manifest's `split` column and rerun: finished slides are kept.")
    metadata = pair_records.dataset_metadata(mpp_5x=args.mpp_5x, mpp_20x=args.mpp_20x,
                                        low_mag_source=args.low_mag_source, resample=args.resample,
                                        allow_upsample=args.allow_upsample)
    summary["pairs"] = assemble.assemble(out_dir, split_shards, args.examples_per_shard, metadata=metadata,
                                         description=f"5x/20x tile pairs written by data_prep.tile_pairs: "
                                                     f"{json.dumps(metadata, sort_keys=True)}")
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows(
        [("slide_id", "split", "pairs", "mpp_level0", "path")]
        + [(s.slide_id, splits[s.slide_id], done[s.slide_id]["num_pairs"], done[s.slide_id]["mpp_level0"], s.path)
           for s in productive])
    atomic.write_text(os.path.join(out_dir, "slides.csv"), table.getvalue())
    summary["seconds"] = round(time.time() - start, 2)
    atomic.write_json(summary_path, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; bad input raises `errors.UserError` (one line, exit 2 through `errors.run_cli`)."""
    args, beam_args = COMMAND.parse(argv)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    summary = run(args, beam_args)
    print(json.dumps(summary, indent=1))
    print(f"dataset: {os.path.abspath(args.out)} (splits {summary['pairs']})")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
