"""Slide embeddings: tissue tiles at a target µm/px through a ViT, one TRIDENT-layout h5 per slide.

    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --checkpoint ckpt/student           # student, 5x
    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --model uni2_h --weights W --mpp 0.5  # teacher, 20x

What a run does (tiling, reading in a child process, resume, OUT/failures.jsonl): `xmag_jax.embed.run`.
"""

from __future__ import annotations

import argparse
import os

from xmag_jax import encoders, errors
from xmag_jax.embed.plan import Tiling
from xmag_jax.embed.run import embed_slides
from xmag_jax.wsi import failures, inputs


class EmbedInputError(errors.UserError):
    """Bad `embed` input: a flag, the slide list, the encoder source, the output folder."""


def _check_args(args: argparse.Namespace) -> None:
    """EmbedInputError for flag values that cannot run, before any slide or weight is read."""
    for flag, value, ok, expected in (
            ("--mpp", args.mpp, args.mpp > 0, "a positive µm/px, e.g. 2.0 (5x) or 0.5 (20x)"),
            ("--patch-px", args.patch_px, args.patch_px > 0, "a positive tile side in px"),
            ("--tissue-threshold", args.tissue_threshold, 0 <= args.tissue_threshold <= 1, "a fraction in [0, 1]"),
            ("--batch", args.batch, args.batch > 0, "a positive number of tiles"),
            ("--workers", args.workers, args.workers > 0, "a positive number of threads"),
            ("--prefetch", args.prefetch, args.prefetch > 0, "a positive number of batches"),
            ("--tokens", args.tokens, args.tokens >= 0, "S >= 0 (0 = no tokens)")):
        if not ok:
            raise EmbedInputError(f"{flag} {value}: expected {expected}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise EmbedInputError(f"--out {args.out} is a file; expected a folder for the {{slide_id}}.h5 files")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xmag_jax.embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--slides", required=True, help="folder of slides, or CSV manifest (path[,slide_id,mpp])")
    p.add_argument("--out", required=True, help="output folder of {slide_id}.h5 (one job at a time)")
    encoders.add_args(p)
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px (2.0 ≈ 5x, 0.5 ≈ 20x)")
    p.add_argument("--patch-px", type=int, default=224, help="tile side in px at --mpp")
    p.add_argument("--tissue-threshold", type=float, default=0.25, help="min tissue fraction of a kept tile")
    p.add_argument("--batch", type=int, default=64, help="tiles per forward (rounded up to a multiple of devices)")
    p.add_argument("--workers", type=int, default=4, help="tile reader threads")
    p.add_argument("--prefetch", type=int, default=4, help="batches read ahead")
    p.add_argument("--overwrite", action="store_true",
                   help="embed again slides whose h5 was made by other weights or settings (else refused)")
    p.add_argument("--no-isolation", action="store_true",
                   help="read tiles in this process (a decoder crash then ends the job)")
    p.add_argument("--tokens", type=int, default=0, metavar="S",
                   help="also store each tile's patch tokens average-pooled to S x S (`tokens [N, S, S, D]` "
                        "float16; S = 4 at 2 µm/px: one word = 112 µm; 0 = off)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    _check_args(args)
    try:
        specs = inputs.list_slides(args.slides)
        encoder = encoders.from_args(args)
    except (ValueError, FileNotFoundError) as e:  # a bad slide list or encoder source (ManifestError included)
        raise EmbedInputError(str(e)) from e
    grid = args.patch_px // encoder.arch.vit.patch_size
    if args.tokens > grid:
        raise EmbedInputError(f"--tokens {args.tokens}: {encoder.name} has a {grid}x{grid} token grid per "
                              f"{args.patch_px} px tile; expected S <= {grid}")
    report = embed_slides(specs, encoder, args.out, Tiling(args.mpp, args.patch_px, args.tissue_threshold),
                          batch=args.batch, workers=args.workers, prefetch=args.prefetch,
                          progress=not args.no_progress, overwrite=args.overwrite, isolate=not args.no_isolation,
                          tokens=args.tokens)
    n_tiles = sum(report.tiles.values())
    print(f"{encoder.name} @ {args.mpp:g} µm/px -> {args.out}: {len(report.done)} embedded ({n_tiles} tiles, "
          f"{len(report.empty)} empty), {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s (+{report.compile_seconds:.1f}s compile)")
    if report.failed:
        print(f"failures: {report.failed} (see {os.path.join(args.out, failures.FAILURES_FILE)})")
    return 1 if report.failed and not report.done and not report.skipped else 0


if __name__ == "__main__":
    errors.run_cli(main, prog="python -m xmag_jax.embed")
