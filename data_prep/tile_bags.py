"""Whole-slide images -> every tissue tile at 5x -> ArrayRecord bags with TFDS metadata (Apache Beam).

    python -m data_prep.tile_bags --slides DIR_OR_CSV --out BAGS [--mpp 2.0 --patch_px 224 --min_tissue 0.25]

The tiles are exactly those `python -m xmag_jax.embed` embeds at the same options (its tissue mask and
grid: `xmag_jax.embed.plan.plan_slide`, tiles read with `slide_reader.read_field`), stored as JPEG so that
end-to-end training (`python -m xmag_jax.finetune`) never opens a slide. Each slide is read once.

Output folder:
  xmag_bags-train.array_record-00000-of-0000N ...  the tiles (`xmag_jax.formats.bag_records`), slide by slide
  dataset_info.json, features.json, metadata.json  TFDS metadata; metadata.json holds the µm/px and tile size
  slides.csv                                       slide_id, first record, tiles, µm/px, px, level-0 field, path
  summary.json, failures.jsonl                     what happened; one JSON line per failed slide
  work/                                            per-slide shards and done markers (resume state)

It runs on the machinery of `data_prep.tile_pairs`: a rerun with the same options skips finished slides
(done markers carry the shard's size and digest), failed slides are retried and listed in failures.jsonl,
shards are written under temp names and renamed, the job fails past --max_failure_fraction, one job at a
time per --out. A slide without tissue is kept out of the bags with a warning in summary.json. Any other
option is an Apache Beam pipeline option.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator

import numpy as np
from absl import flags

from data_prep import assemble, pairs, tile_pairs
from xmag_jax import atomic, cli, errors, geometry, workdir_lock
from xmag_jax.embed import plan as embed_plan
from xmag_jax.formats import bag_records
from xmag_jax.wsi import failures, inputs, slide_reader, tissue

PROG = "python -m data_prep.tile_bags"


@dataclasses.dataclass(frozen=True)
class BagConfig:
    """Tiles of `patch_px` px at `mpp` µm/px, kept with tissue fraction >= `min_tissue` (as embed's `Tiling`)."""

    mpp: float = geometry.MPP_5X
    patch_px: int = geometry.TILE_PX
    min_tissue: float = 0.25
    jpeg_quality: int = 90
    thumb_mpp: float = tissue.THUMBNAIL_MPP
    progress: bool = True

    def fingerprint(self, spec: inputs.SlideSpec) -> str:
        return pairs.fingerprint(self, spec)


def process_slide(spec: inputs.SlideSpec, config: BagConfig, work_dir: str, overlay_dir: str | None) -> dict:
    """Every tissue tile of one slide into its shard under `work_dir`; returns the done marker or failure record."""
    tiling = embed_plan.Tiling(mpp=config.mpp, patch_px=config.patch_px, min_tissue=config.min_tissue)

    def records_of(slide: slide_reader.Slide) -> tuple[int, Iterator[bytes], dict]:
        plan = embed_plan.plan_slide(slide, spec, tiling)
        mpp = plan.field_level0 * slide.mpp / config.patch_px

        def tiles() -> Iterator[bytes]:
            for x, y in plan.coords.tolist():
                image = slide_reader.read_field_image(slide, x, y, plan.field_level0, config.patch_px)
                yield bag_records.encode_tile({"image": pairs.encode_jpeg(image, config.jpeg_quality),
                                               "slide_id": spec.slide_id, "x": x, "y": y, "mpp": mpp})
        return len(plan.coords), tiles(), {"field_level0": plan.field_level0, "mpp": mpp}

    return pairs.write_slide_shard(spec, config, work_dir, records_of, unit="tile")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("slides", None, "folder of slides or a CSV manifest (path [, slide_id, mpp])",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "output dataset folder", flag_values=fv)
    flags.DEFINE_float("mpp", geometry.MPP_5X, "µm/px of the tiles (2.0 = 5x)", flag_values=fv)
    flags.DEFINE_integer("patch_px", geometry.TILE_PX, "tile side in px", flag_values=fv)
    flags.DEFINE_float("min_tissue", 0.25, "keep tiles whose field is at least this fraction tissue (as embed)",
                       flag_values=fv)
    flags.DEFINE_float("thumbnail_mpp", tissue.THUMBNAIL_MPP, "µm/px of the tissue mask", flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality (1..100)", flag_values=fv)
    flags.DEFINE_integer("examples_per_shard", 10000, "tiles per output shard", flag_values=fv)
    tile_pairs.define_job_flags(fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("slides", "out"), pass_through=True,
                      positional="[Beam pipeline options]")


def check_args(args: flags.FlagValues) -> None:
    """Raises UserError (one line) for option values no job can run with; before anything is read."""
    checks = [
        (not os.path.exists(args.out) or os.path.isdir(args.out), "--out", "a folder (this is a file)", args.out),
        (args.mpp > 0, "--mpp", "a pixel size > 0 µm/px", args.mpp),
        (args.thumbnail_mpp > 0, "--thumbnail_mpp", "a pixel size > 0 µm/px", args.thumbnail_mpp),
        (args.patch_px >= 14, "--patch_px", "a tile side >= 14 px", args.patch_px),
        (0 <= args.min_tissue <= 1, "--min_tissue", "a fraction in [0, 1]", args.min_tissue),
        (1 <= args.jpeg_quality <= 100, "--jpeg_quality", "a JPEG quality in 1..100", args.jpeg_quality),
        (args.examples_per_shard >= 1, "--examples_per_shard", "at least 1 tile per shard", args.examples_per_shard),
        (0 <= args.max_failure_fraction <= 1, "--max_failure_fraction", "a fraction in [0, 1]",
         args.max_failure_fraction),
    ]
    for ok, flag, expected, value in checks:
        if not ok:
            raise errors.UserError(f"{flag} {value}: expected {expected}")


def run(args: flags.FlagValues, beam_args: list[str]) -> dict:
    """Tile, assemble and report; returns the summary. SystemExit past --max_failure_fraction or when no
    slide gave a tile; `workdir_lock.WorkdirLocked` while another job works on --out."""
    check_args(args)
    options = tile_pairs.pipeline_options(beam_args)
    out_dir = os.path.abspath(args.out)
    specs = inputs.list_slides(args.slides)
    with workdir_lock.hold(out_dir, job="tile_bags"):
        return _run_locked(args, options, out_dir, specs)


def _run_locked(args: flags.FlagValues, options, out_dir: str, specs: list[inputs.SlideSpec]) -> dict:
    start = time.time()
    work_dir = os.path.join(out_dir, "work")
    os.makedirs(work_dir, exist_ok=True)
    tile_pairs.clean_stale_temps(out_dir, work_dir)
    config = BagConfig(mpp=args.mpp, patch_px=args.patch_px, min_tissue=args.min_tissue,
                       jpeg_quality=args.jpeg_quality, thumb_mpp=args.thumbnail_mpp, progress=args.progress)
    already = {s.slide_id for s in specs if pairs.read_done(work_dir, s, config)}
    todo = [s for s in specs if s.slide_id not in already]
    if todo:
        tile_pairs.run_pipeline(todo, config, work_dir, None, options, args.isolation, process_slide)
    done, failed = tile_pairs.collect_results(specs, config, out_dir, work_dir)
    productive = [s for s in specs if done[s.slide_id] and done[s.slide_id]["num_pairs"] > 0]
    summary = {
        "slides": len(specs), "skipped_already_done": len(already), "tiled_now": len(todo) - len(failed),
        "failed": len(failed), "failures_by_type": failures.count_by_type(failed), "tiles": 0,
        "slides_with_tiles": len(productive),
        "slides_without_tissue": sorted(k for k, d in done.items() if d and d["num_pairs"] == 0),
    }
    summary_path = os.path.join(out_dir, "summary.json")
    too_many = failed and len(failed) > args.max_failure_fraction * len(specs)
    if too_many or not productive:
        summary["seconds"] = round(time.time() - start, 2)
        atomic.write_json(summary_path, summary)
        why = (f"{len(failed)} of {len(specs)} slides failed ({summary['failures_by_type']}), more than "
               f"--max_failure_fraction {args.max_failure_fraction}" if too_many else "no slide gave a tissue tile")
        raise SystemExit(f"FAILED: {why}; see {os.path.join(out_dir, failures.FAILURES_FILE)} and {summary_path}. "
                         f"Fix or remove them and rerun: finished slides are kept.")
    metadata = {"mpp": args.mpp, "patch_px": args.patch_px, "min_tissue": args.min_tissue,
                "thumbnail_mpp": args.thumbnail_mpp, "tiling": "xmag_jax.embed.plan.plan_slide"}
    counts = assemble.assemble(out_dir,
                               {bag_records.SPLIT: [pairs.shard_path(work_dir, s.slide_id) for s in productive]},
                               args.examples_per_shard, metadata=metadata, dataset_name=bag_records.DATASET_NAME,
                               features=bag_records.features(),
                               description=f"5x tissue tiles per slide written by data_prep.tile_bags: "
                                           f"{json.dumps(metadata, sort_keys=True)}")
    firsts = np.concatenate([[0], np.cumsum([done[s.slide_id]["num_pairs"] for s in productive])])
    bag_records.write_slides(os.path.join(out_dir, bag_records.SLIDES_FILE), [
        bag_records.SlideEntry(s.slide_id, int(first), done[s.slide_id]["num_pairs"], done[s.slide_id]["mpp"],
                               args.patch_px, done[s.slide_id]["field_level0"], done[s.slide_id]["mpp_level0"],
                               os.path.abspath(s.path)) for s, first in zip(productive, firsts)])
    summary["tiles"] = counts[bag_records.SPLIT]
    summary["seconds"] = round(time.time() - start, 2)
    atomic.write_json(summary_path, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; bad input raises `errors.UserError` (one line, exit 2 through `errors.run_cli`)."""
    args, beam_args = COMMAND.parse(argv)
    summary = run(args, beam_args)
    print(json.dumps(summary, indent=1))
    if summary["slides_without_tissue"]:
        print(f"warning: {len(summary['slides_without_tissue'])} slide(s) without a tissue tile left out: "
              f"{summary['slides_without_tissue']}")
    print(f"bags: {os.path.abspath(args.out)} ({summary['tiles']} tiles of {summary['slides_with_tiles']} slides)")
    return 0


if __name__ == "__main__":
    # Through the importable module: Beam's workers and the isolated slide reader unpickle `BagConfig` and
    # `process_slide` by their module's name, which `__main__` is not.
    from data_prep import tile_bags

    errors.run_cli(tile_bags.main, prog=PROG)
