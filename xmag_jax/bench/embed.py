"""Slide embedding speed: the student at 5x against the teacher at 20x, through the same reader.

    python -m xmag_jax.bench embed [--models student=vit_test,teacher=vit_test_teacher] [--n_slides 4]
        [--size 8192] [--teacher_depth N] [--dtype bfloat16] [--slides DIR] [--out results.json]

Writes `--n_slides` synthetic slides (`xmag_jax.wsi.synthetic`, `--size` px at 0.25 µm/px) unless `--slides`
is given, then runs `xmag_jax.embed.run.embed_slides` twice on them: the student at `--student_mpp` (2.0 µm/px,
5x) and the teacher at `--teacher_mpp` (0.5 µm/px, 20x). Both use random-init weights (speed does not
depend on them). Reports, per model: wall time per slide (after the one-off compile, which is listed
apart), patches per slide, patches/s, WSIs/min; then the teacher/student ratios of time and patches.
Real sizes (`student=vit_s14,teacher=uni2_h`) want an accelerator; `--teacher_depth` cuts the teacher's
depth to fit a small one (its time then scales about linearly back with depth).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import warnings

import jax
from absl import flags

from xmag_jax import cli, encoders, errors, geometry
from xmag_jax.embed import plan, run
from xmag_jax.wsi import inputs, synthetic


def run_model(label: str, name: str, specs, out_dir: pathlib.Path, mpp: float, args, **overrides) -> dict:
    encoder = encoders.load_encoder(model=name, random_init=True, dtype=args.dtype, **overrides)
    tiling = plan.Tiling(mpp, min_tissue=args.tissue_threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty slides are counted below
        report = run.embed_slides(specs, encoder, out_dir / label, tiling, batch=args.batch, workers=args.workers,
                                    progress=False)
    n = len(report.done)
    tiles = sum(report.tiles.values())
    return {
        "model": name + (f" (depth {overrides['depth']})" if "depth" in overrides else ""),
        "mpp": mpp,
        "slides": n,
        "failed": len(report.failed),
        "empty": len(report.empty),
        "patches": tiles,
        "patches_per_slide": tiles / max(n, 1),
        "seconds": report.seconds,
        "seconds_per_slide": report.seconds / max(n, 1),
        "patches_per_second": tiles / max(report.seconds, 1e-9),
        "wsi_per_minute": 60.0 * n / max(report.seconds, 1e-9),
        "compile_seconds": report.compile_seconds,
    }


def parse_models(text: str) -> dict[str, str]:
    models = dict(item.split("=", 1) for item in text.split(","))
    if set(models) != {"student", "teacher"}:
        raise errors.UserError(f"--models must name student=... and teacher=..., got {text!r}")
    return models


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("models", "student=vit_test,teacher=vit_test_teacher", "registry names of both encoders",
                        flag_values=fv)
    flags.DEFINE_integer("n_slides", 4, "synthetic slides", flag_values=fv)
    flags.DEFINE_integer("size", 8192, "synthetic slide side in px at 0.25 µm/px", flag_values=fv)
    flags.DEFINE_string("slides", None, "use these slides (folder or CSV) instead of synthetic ones", flag_values=fv)
    flags.DEFINE_float("student_mpp", geometry.MPP_5X, "µm/px of the student's tiles", flag_values=fv)
    flags.DEFINE_float("teacher_mpp", geometry.MPP_20X, "µm/px of the teacher's tiles", flag_values=fv)
    flags.DEFINE_integer("teacher_depth", None, "override the teacher's depth (fit a real size on a small device)",
                         flag_values=fv)
    flags.DEFINE_string("dtype", None, "compute dtype of both models, e.g. bfloat16 (default: the models')",
                        flag_values=fv)
    flags.DEFINE_integer("batch", 64, "tiles per forward", flag_values=fv)
    flags.DEFINE_integer("workers", 4, "tile reader threads", flag_values=fv)
    flags.DEFINE_float("tissue_threshold", 0.25, "min tissue fraction of a kept tile", flag_values=fv)
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


COMMAND = cli.Command("python -m xmag_jax.bench embed", _define, doc=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    models = parse_models(args.models)

    with tempfile.TemporaryDirectory(prefix="xmag_bench_embed_") as tmp:
        tmp = pathlib.Path(tmp)
        if args.slides:
            specs, source = inputs.list_slides(args.slides), args.slides
        else:
            synthetic.write_dataset(str(tmp / "slides"), args.n_slides, args.size)
            specs = inputs.list_slides(str(tmp / "slides"))
            source = f"{args.n_slides} synthetic slides of {args.size} px at 0.25 µm/px ({args.size * 0.25e-3:.2f} mm)"
        devices = jax.local_devices()
        print(f"embed benchmark: {source}; {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
              f"batch {args.batch}, {args.workers} reader threads, {os.cpu_count()} CPUs")
        teacher_overrides = {"depth": args.teacher_depth} if args.teacher_depth else {}
        results = {
            "student": run_model("student", models["student"], specs, tmp, args.student_mpp, args),
            "teacher": run_model("teacher", models["teacher"], specs, tmp, args.teacher_mpp, args, **teacher_overrides),
        }
    for role, r in results.items():
        print(f"{role:8s} {r['model']:22s} @ {r['mpp']:.2f} µm/px: {r['seconds_per_slide']:8.3f} s/slide  "
              f"{r['patches_per_slide']:8.1f} patches/slide  {r['patches_per_second']:8.1f} patches/s  "
              f"{r['wsi_per_minute']:8.2f} WSIs/min  (compile {r['compile_seconds']:.1f} s; "
              f"{r['slides']} slides, {r['empty']} empty, {r['failed']} failed)")
    s, t = results["student"], results["teacher"]
    results["ratio"] = {"time_per_slide": t["seconds_per_slide"] / max(s["seconds_per_slide"], 1e-9),
                        "patches_per_slide": t["patches_per_slide"] / max(s["patches_per_slide"], 1e-9)}
    print(f"teacher/student: {results['ratio']['time_per_slide']:.1f}x wall time per slide, "
          f"{results['ratio']['patches_per_slide']:.1f}x patches per slide")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    return 0
