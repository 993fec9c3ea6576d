"""`python -m xmag_jax.demo --out DIR`: the whole XMAG loop on synthetic slides, on CPU: about 7 minutes on 2 cores
up to the probe, then the end-to-end fine-tuning stage (40 steps of 4 slides x 8 tiles and two compiles).

synthetic slides -> 5x/20x tile pairs (Beam -> ArrayRecord) -> a stand-in 20x teacher (`xmag_jax.demo_teacher`:
the tiny teacher trained on the 20x tiles' texture classes, since no foundation model can be downloaded here)
-> a 400-step distillation into a tiny 5x student (configs/demo.py) -> export of the student to timm -> slide
embeddings at 5x (TRIDENT h5) -> linear probe and kNN of the distilled student against the same student before
training (its random init, `distill.export --initial`) on the slides' texture classes (round vs spindle nuclei:
clear at 20x, subtle at 5x) -> 5x tile bags -> end-to-end MIL fine-tuning of the distilled student on those classes
against the same attention-MIL head on its frozen features, on the same folds (`configs/mil_e2e_debug.py`).

Each stage is the project's own command line, run as a subprocess, so the demo shows exactly what a user types.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import flags

from xmag_jax import cli, errors, geometry

PROG = "python -m xmag_jax.demo"

# The demo's fine-tuning: configs/mil_e2e_debug.py, longer (4 training slides a fold make one step an epoch).
FINETUNE_ARGS = ["--config.train.epochs=20", "--config.frozen.epochs=20", "--config.heatmap_slides=1"]


def run_stage(title: str, args: list[str], env: dict[str, str]) -> None:
    """Runs `python -m ...` for one stage; stops the demo with the stage's name if it fails."""
    cmd = [sys.executable, "-m", *args]
    print(f"\n=== {title}\n$ {shlex.join(['python', '-m', *args])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo stage '{title}' failed with exit code {result.returncode}")
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", "demo_out", "output folder (replaced if it exists)", flag_values=fv)
    flags.DEFINE_integer("slides", 8, "number of synthetic slides", flag_values=fv)
    flags.DEFINE_integer("slide_size", 8192, "slide side in px at 0.25 µm/px", flag_values=fv)
    flags.DEFINE_integer("teacher_steps", 80, "stand-in teacher training steps", flag_values=fv)
    flags.DEFINE_integer("steps", None, "distillation steps (default: configs/demo.py's)", flag_values=fv)
    flags.DEFINE_float("lr", None, "distillation peak learning rate (default: configs/demo.py's)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the slides, teacher and distillation", flag_values=fv)
    flags.DEFINE_bool("finetune", True, "end with 5x tile bags and end-to-end MIL from the distilled student "
                      "against its frozen features (--nofinetune: stop after the probe)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)

    out = Path(args.out).resolve()
    if out.exists():
        print(f"removing the previous demo output {out}")
        shutil.rmtree(out)
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    slides, pairs, workdir = out / "slides", out / "pairs", out / "workdir"
    student_dir, timm_dir, initial_dir = out / "student", out / "student_timm", out / "student_initial"

    teacher = out / "teacher"
    run_stage("synthetic slides", ["xmag_jax.wsi.synthetic", "--out", str(slides), "--n", str(args.slides),
                                   "--size", str(args.slide_size), "--seed", str(args.seed)], env)
    run_stage("tile pairs", ["data_prep.tile_pairs", "--slides", str(slides), "--out", str(pairs)], env)
    run_stage(
        "stand-in teacher (20x, trained on the slides' texture classes)",
        ["xmag_jax.demo_teacher", "--pairs", str(pairs), "--labels", str(slides / "labels.csv"),
         "--out", str(teacher), "--steps", str(args.teacher_steps), "--seed", str(args.seed)],
        env,
    )
    run_stage(
        "distillation",
        [
            "xmag_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
            f"--config.data.dir={pairs}", f"--config.seed={args.seed}", f"--config.teacher.checkpoint={teacher}",
            *([f"--config.total_steps={args.steps}"] if args.steps is not None else []),
            *([f"--config.optim.lr={args.lr}"] if args.lr is not None else []),
        ],
        env,
    )
    run_stage("export student", ["xmag_jax.distill.export", "--workdir", str(workdir), "--out", str(student_dir)], env)
    run_stage("export the same student before training (the random-init baseline)",
              ["xmag_jax.distill.export", "--workdir", str(workdir), "--initial", "--out", str(initial_dir)], env)
    run_stage("export to timm",
              ["xmag_jax.convert", "export", "--checkpoint", str(student_dir), "--out", str(timm_dir)], env)
    features = {"distilled": out / "features_distilled", "random_init": out / "features_random_init"}
    run_stage(
        "slide embeddings at 5x (distilled student, from its timm export)",
        ["xmag_jax.embed", "--slides", str(slides), "--out", str(features["distilled"]),
         "--timm_dir", str(timm_dir), "--mpp", str(geometry.MPP_5X), "--noprogress"],
        env,
    )
    run_stage(
        "slide embeddings at 5x (random-init student, the baseline)",
        ["xmag_jax.embed", "--slides", str(slides), "--out", str(features["random_init"]),
         "--checkpoint", str(initial_dir), "--mpp", str(geometry.MPP_5X), "--noprogress"],
        env,
    )
    run_stage(
        "linear probe and kNN on the slides' texture classes",
        ["xmag_jax.eval", "probe", *(f"--features={name}={path}" for name, path in features.items()),
         "--labels", str(slides / "labels.csv"), "--out", str(out / "probe.json")],
        env,
    )
    if args.finetune:
        run_stage("5x tile bags for end-to-end training",
                  ["data_prep.tile_bags", "--slides", str(slides), "--out", str(out / "bags"), "--noprogress"], env)
        run_stage("end-to-end MIL from the distilled student, against the same head on its frozen features",
                  finetune_stage(out, slides / "labels.csv", student_dir, args.seed), env)
    print(f"\ndemo finished: outputs in {out}")
    print(comparison_line(out / "probe.json"))
    if args.finetune:
        print(finetune_line(out / "finetune" / "results.json"))
    return 0


def finetune_stage(out: Path, labels: Path, student_dir: Path, seed: int) -> list[str]:
    """The fine-tuning stage's command line: configs/mil_e2e_debug.py on `out/bags` from the distilled student."""
    return ["xmag_jax.finetune", "--config", "configs/mil_e2e_debug.py", "--workdir", str(out / "finetune"),
            f"--config.data.bags={out / 'bags'}", f"--config.data.labels={labels}",
            f"--config.model.init={student_dir}", f"--config.seed={seed}", *FINETUNE_ARGS]


def finetune_line(results_json: Path) -> str:
    """One line: mean AUC and balanced accuracy over the folds, end to end vs frozen features."""
    r = json.loads(results_json.read_text())
    e2e, frozen = r["end_to_end"], r["frozen"]
    return (f"end to end vs frozen features, from the distilled student ({r['folds']} folds): AUC "
            f"{e2e['auc_mean']:.3f} vs {frozen['auc_mean']:.3f}, balanced acc {e2e['balanced_acc_mean']:.3f} "
            f"vs {frozen['balanced_acc_mean']:.3f}")


def comparison_line(probe_json: Path) -> str:
    """One line: balanced accuracy and AUC of the distilled and the random-init student, linear probe and kNN."""
    results = json.loads(probe_json.read_text())
    parts = []
    for method in ("linear", "knn"):
        d, r = results["distilled"][method], results["random_init"][method]
        parts.append(f"{method} balanced acc {d['balanced_accuracy']['value']:.3f} "
                     f"vs {r['balanced_accuracy']['value']:.3f}, "
                     f"AUC {d['auc']['value']:.3f} vs {r['auc']['value']:.3f}")
    return "distilled vs random-init student at 5x: " + "; ".join(parts)


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
