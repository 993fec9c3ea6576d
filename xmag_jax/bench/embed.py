"""Slide embedding speed: the student at 5x against the teacher at 20x, through the same reader.

    python -m xmag_jax.bench embed [--models student=vit_test,teacher=vit_test_teacher] [--n-slides 4]
        [--size 8192] [--teacher-depth N] [--dtype bfloat16] [--slides DIR] [--out results.json]

Writes `--n-slides` synthetic slides (`xmag_jax.wsi.synthetic`, `--size` px at 0.25 µm/px) unless `--slides`
is given, then runs `xmag_jax.embed.run.embed_slides` twice on them: the student at `--student-mpp` (2.0 µm/px,
5x) and the teacher at `--teacher-mpp` (0.5 µm/px, 20x). Both use random-init weights (speed does not
depend on them). Reports, per model: wall time per slide (after the one-off compile, which is listed
apart), patches per slide, patches/s, WSIs/min; then the teacher/student ratios of time and patches.
Real sizes (`student=vit_s14,teacher=uni2_h`) want an accelerator; `--teacher-depth` cuts the teacher's
depth to fit a small one (its time then scales about linearly back with depth).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import warnings

import jax

from xmag_jax import encoders
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
        raise SystemExit(f"--models must name student=... and teacher=..., got {text!r}")
    return models


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m xmag_jax.bench embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="student=vit_test,teacher=vit_test_teacher")
    p.add_argument("--n-slides", type=int, default=4)
    p.add_argument("--size", type=int, default=8192, help="synthetic slide side in px at 0.25 µm/px")
    p.add_argument("--slides", help="use these slides (folder or CSV) instead of synthetic ones")
    p.add_argument("--student-mpp", type=float, default=2.0)
    p.add_argument("--teacher-mpp", type=float, default=0.5)
    p.add_argument("--teacher-depth", type=int, help="override the teacher's depth (fit a real size on a small device)")
    p.add_argument("--dtype", help="compute dtype of both models, e.g. bfloat16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tissue-threshold", type=float, default=0.25)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
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
