"""Slide embeddings: tissue tiles at a target µm/px through a ViT, one TRIDENT-layout h5 per slide.

    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --checkpoint ckpt/student           # student, 5x
    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --model uni2_h --weights W --mpp 0.5  # teacher, 20x

What a run does (tiling, reading in a child process, resume, OUT/failures.jsonl): `xmag_jax.embed.run`.
"""

from __future__ import annotations

import os

from absl import flags

from xmag_jax import cli, encoders, errors, geometry
from xmag_jax.embed.plan import Tiling
from xmag_jax.embed.run import embed_slides
from xmag_jax.wsi import failures, inputs


class EmbedInputError(errors.UserError):
    """Bad `embed` input: a flag, the slide list, the encoder source, the output folder."""


def _check_args(args: flags.FlagValues) -> None:
    """EmbedInputError for flag values that cannot run, before any slide or weight is read."""
    for flag, value, ok, expected in (
            ("--mpp", args.mpp, args.mpp > 0, "a positive µm/px, e.g. 2.0 (5x) or 0.5 (20x)"),
            ("--patch_px", args.patch_px, args.patch_px > 0, "a positive tile side in px"),
            ("--tissue_threshold", args.tissue_threshold, 0 <= args.tissue_threshold <= 1, "a fraction in [0, 1]"),
            ("--batch", args.batch, args.batch > 0, "a positive number of tiles"),
            ("--workers", args.workers, args.workers > 0, "a positive number of threads"),
            ("--prefetch", args.prefetch, args.prefetch > 0, "a positive number of batches"),
            ("--tokens", args.tokens, args.tokens >= 0, "S >= 0 (0 = no tokens)")):
        if not ok:
            raise EmbedInputError(f"{flag} {value}: expected {expected}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise EmbedInputError(f"--out {args.out} is a file; expected a folder for the {{slide_id}}.h5 files")


PROG = "python -m xmag_jax.embed"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("slides", None, "folder of slides, or CSV manifest (path[,slide_id,mpp])", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder of {slide_id}.h5 (one job at a time)", flag_values=fv)
    encoders.define_flags(fv)
    flags.DEFINE_float("mpp", geometry.MPP_5X, "target µm/px (2.0 ≈ 5x, 0.5 ≈ 20x)", flag_values=fv)
    flags.DEFINE_integer("patch_px", geometry.TILE_PX, "tile side in px at --mpp", flag_values=fv)
    flags.DEFINE_float("tissue_threshold", 0.25, "min tissue fraction of a kept tile", flag_values=fv)
    flags.DEFINE_integer("batch", 64, "tiles per forward (rounded up to a multiple of devices)", flag_values=fv)
    flags.DEFINE_integer("workers", 4, "tile reader threads", flag_values=fv)
    flags.DEFINE_integer("prefetch", 4, "batches read ahead", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "embed again slides whose h5 was made by other weights or settings "
                      "(else refused)", flag_values=fv)
    flags.DEFINE_bool("isolation", True, "read tiles in a child process, so a decoder crash fails that slide only "
                      "(--noisolation: in this process; a crash then ends the job)", flag_values=fv)
    flags.DEFINE_integer("tokens", 0, "S: also store each tile's patch tokens average-pooled to S x S (`tokens "
                         "[N, S, S, D]` float16; S = 4 at 2 µm/px: one word = 112 µm; 0 = off)", flag_values=fv)
    flags.DEFINE_bool("progress", True, "progress bar (--noprogress: none)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__.split("\n\n")[0], required=("slides", "out"),
                      one_of=(encoders.SOURCE_FLAGS,))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    _check_args(args)
    try:
        specs = inputs.list_slides(args.slides)
        encoder = encoders.from_flags(args)
    except (ValueError, FileNotFoundError) as e:  # a bad slide list or encoder source (ManifestError included)
        raise EmbedInputError(str(e)) from e
    grid = args.patch_px // encoder.arch.vit.patch_size
    if args.tokens > grid:
        raise EmbedInputError(f"--tokens {args.tokens}: {encoder.name} has a {grid}x{grid} token grid per "
                              f"{args.patch_px} px tile; expected S <= {grid}")
    report = embed_slides(specs, encoder, args.out, Tiling(args.mpp, args.patch_px, args.tissue_threshold),
                          batch=args.batch, workers=args.workers, prefetch=args.prefetch,
                          progress=args.progress, overwrite=args.overwrite, isolate=args.isolation,
                          tokens=args.tokens)
    n_tiles = sum(report.tiles.values())
    print(f"{encoder.name} @ {args.mpp:g} µm/px -> {args.out}: {len(report.done)} embedded ({n_tiles} tiles, "
          f"{len(report.empty)} empty), {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s (+{report.compile_seconds:.1f}s compile)")
    if report.failed:
        print(f"failures: {report.failed} (see {os.path.join(args.out, failures.FAILURES_FILE)})")
    return 1 if report.failed and not report.done and not report.skipped else 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
