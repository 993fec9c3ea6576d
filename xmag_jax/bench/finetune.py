"""`python -m xmag_jax.bench finetune [--config configs/mil_e2e_debug.py] [--model vit_test] [--patch_px 224]`
and `python -m xmag_jax.bench finetune --compare --out DIR [--slides 48 --folds 4 --config.KEY=VALUE]`.

Timing: times the jitted end-to-end training step (student forward/backward with the config's remat and dtype, the
GatedABMIL head, AdamW groups) on random uint8 tiles already on the mesh: the first step (compile) apart,
then the median of `--steps` steps. Reports tiles/s and slides/s (`slides_per_step x tiles_per_slide` tiles
per step). The student is randomly initialised from the registry (`--model`), so no checkpoint is needed.

`--compare`: end to end against the frozen baseline at a size CI cannot afford: `--slides` synthetic slides with
texture labels tiled into bags, a random `vit_test` student, `--folds` folds (default config
`configs/mil_e2e_synthetic.py`); prints the per-fold AUCs, their means, the pooled out-of-fold AUC with a
bootstrap CI for each method and a paired bootstrap of their difference; DIR keeps the slides, bags and the run
(a rerun resumes it).
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from xmag_jax import cli, errors, geometry, models, sharding
from xmag_jax.eval import metrics
from xmag_jax.finetune import model as model_lib
from xmag_jax.finetune import run as finetune_run
from xmag_jax.models import checkpoint
from xmag_jax.wsi import synthetic


def _define(values: flags.FlagValues, compare: bool = False) -> None:
    flags.DEFINE_string("model", "vit_test", "Registry name of the student.", flag_values=values)
    flags.DEFINE_integer("patch_px", 56 if compare else geometry.TILE_PX, "Tile side, px.", flag_values=values)
    flags.DEFINE_integer("steps", 5, "Timed steps after the compile step.", flag_values=values)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", flag_values=values)
    flags.DEFINE_bool("compare", False, "End to end vs frozen on synthetic slides (module doc).", flag_values=values)
    flags.DEFINE_string("out", "bench_finetune_compare", "--compare: folder of the slides, bags and run.",
                        flag_values=values)
    flags.DEFINE_integer("slides", 48, "--compare: synthetic slides.", flag_values=values)
    flags.DEFINE_integer("folds", 4, "--compare: cross-validation folds.", flag_values=values)
    flags.DEFINE_integer("slide_size", 4096, "--compare: slide side, px at 0.25 µm/px.", flag_values=values)
    flags.DEFINE_float("mpp", 1.0, "--compare: µm/px of the bag tiles.", flag_values=values)


PROG = "python -m xmag_jax.bench finetune"
COMMAND = cli.Command(PROG, _define, doc=__doc__, config=("configs/mil_e2e_debug.py", "Finetune config file."))
COMPARE = cli.Command(PROG, functools.partial(_define, compare=True), doc=__doc__,
                      config=("configs/mil_e2e_synthetic.py", "Finetune config file."))


def _flags(argv: list[str]) -> flags.FlagValues:
    values, _ = (COMPARE if "--compare" in argv else COMMAND).parse(argv)
    if values.steps < 1:
        raise errors.UserError(f"--steps must be >= 1, got {values.steps}")
    return values


def run(config, model: str, patch_px: int, steps: int) -> dict:
    cfg = config
    arch = models.get_arch(model, dtype=cfg.model.dtype, remat=bool(cfg.model.remat))
    mesh = sharding.make_mesh(cfg.mesh)
    e2e = model_lib.random_model(cfg, arch, 2, cfg.seed)
    graphdef, trainable, frozen, rest = model_lib.split(
        e2e, model_lib.trainable_filter(arch.vit.depth, cfg.model.freeze_blocks))
    tx = model_lib.optimizer(cfg, trainable, arch.vit.depth, total_steps=1000)
    fns = model_lib.make_functions(graphdef, arch, tx, mesh)
    trainable, frozen, rest = jax.device_put((trainable, frozen, rest), fns.replicated)
    opt_state = jax.device_put(tx.init(trainable), fns.replicated)
    s, t, a = cfg.train.slides_per_step, cfg.train.tiles_per_slide, cfg.train.grad_accum
    rng = np.random.default_rng(cfg.seed)
    images = jax.device_put(rng.integers(0, 256, (a, s // a * t, patch_px, patch_px, 3), np.uint8),
                            fns.batch_sharding)
    mask, labels = np.ones((a, s // a, t), bool), (np.arange(s) % 2).reshape(a, s // a).astype(np.int32)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        trainable, opt_state, out = fns.train_step(trainable, opt_state, frozen, rest, images, mask, labels,
                                                   jax.random.key(i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"model": model, "patch_px": patch_px, "slides_per_step": s, "tiles_per_slide": t, "grad_accum": a,
            "remat": bool(cfg.model.remat), "dtype": cfg.model.dtype, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "compile_step_s": round(times[0], 3),
            "step_s": round(step, 4), "tiles_per_s": round(s * t / step, 2), "slides_per_s": round(s / step, 3),
            "loss": float(out["loss"])}


def synthetic_cohort(out: pathlib.Path, slides: int, size_px: int, mpp: float, patch_px: int, seed: int
                     ) -> tuple[str, str, str]:
    """Synthetic slides with texture labels (`xmag_jax.wsi.synthetic`), their tile bags (`python -m
    data_prep.tile_bags`, in a subprocess: the library does not import the pipelines) and a random `vit_test`
    student with LayerScale 1.0 (the registry's 1e-5 makes a random student's features nearly
    image-independent); returns (bags dir, labels CSV, student checkpoint). Reused where present."""
    if not (out / "slides" / "labels.csv").exists():
        synthetic.write_dataset(str(out / "slides"), slides, size_px=size_px, seed=seed)
    if not (out / "bags" / "slides.csv").exists():
        subprocess.run([sys.executable, "-m", "data_prep.tile_bags", "--slides", str(out / "slides"), "--out",
                        str(out / "bags"), "--mpp", str(mpp), "--patch_px", str(patch_px), "--noprogress",
                        "--noisolation", "--direct_running_mode=in_memory", "--direct_num_workers=1"], check=True)
    if not (out / "init" / "arch.json").exists():
        checkpoint.save_model(out / "init", models.create_model("vit_test", rngs=nnx.Rngs(seed), init_values=1.0),
                              "vit_test")
    return str(out / "bags"), str(out / "slides" / "labels.csv"), str(out / "init")


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int, n: int = 2000) -> dict:
    """AUC(a) - AUC(b) on the same slides (`a`, `b`: `[N, C]` probabilities) with a percentile bootstrap over
    slides (the same resample for both), and the fraction of resamples where a wins."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        pick = rng.integers(0, len(y), len(y))
        if len(np.unique(y[pick])) == 2:
            diffs.append(metrics.macro_auc(y[pick], a[pick]) - metrics.macro_auc(y[pick], b[pick]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"value": metrics.macro_auc(y, a) - metrics.macro_auc(y, b), "low": float(low), "high": float(high),
            "p_a_wins": float(np.mean(np.asarray(diffs) > 0))}


def compare(values: flags.FlagValues) -> dict:
    """End to end vs frozen on `--slides` synthetic slides, `--folds` folds: the finetune run's results.json
    plus the paired bootstrap of the pooled out-of-fold AUC difference."""
    out = pathlib.Path(values.out)
    bags, labels, init = synthetic_cohort(out, values.slides, values.slide_size, values.mpp, values.patch_px,
                                          values.config.seed)
    c = values.config
    c.data.bags, c.data.labels, c.model.init, c.data.folds = bags, labels, init, values.folds
    summary = finetune_run.run(c, str(out / "work"))
    results = [json.loads((out / "work" / f"fold_{k}" / "result.json").read_text()) for k in range(summary["folds"])]
    y = np.concatenate([r["y"] for r in results])
    pooled = {m: np.concatenate([r[m] for r in results]) for m in finetune_run.METHODS}
    summary["paired_auc_difference"] = paired_auc_difference(y, pooled["end_to_end"], pooled["frozen"], c.seed)
    return summary


def compare_report(summary: dict) -> str:
    lines = []
    for m in finetune_run.METHODS:
        s = summary[m]
        auc = s["pooled"]["auc"]
        lines.append(f"{m:>10}: AUC per fold {[round(a, 3) for a in s['auc']]}, mean {s['auc_mean']:.3f} ± "
                     f"{s['auc_std']:.3f}; pooled out-of-fold AUC {auc['value']:.3f} [{auc['low']:.3f}, "
                     f"{auc['high']:.3f}]; balanced acc mean {s['balanced_acc_mean']:.3f}")
    d = summary["paired_auc_difference"]
    wins = sum(a > b for a, b in zip(summary["end_to_end"]["auc"], summary["frozen"]["auc"]))
    lines.append(f"end to end - frozen, pooled AUC: {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                 f"(paired bootstrap over slides, end to end ahead in {d['p_a_wins']:.1%} of resamples); "
                 f"end to end ahead in {wins} of {summary['folds']} folds; {summary['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    values = _flags(argv)
    if values.compare:
        summary = compare(values)
        print(json.dumps(summary) if values.json else compare_report(summary))
        return 0
    result = run(values.config, values.model, values.patch_px, values.steps)
    if values.json:
        print(json.dumps(result))
    else:
        print(f"finetune step: {result['model']} {result['patch_px']} px, {result['slides_per_step']} slides x "
              f"{result['tiles_per_slide']} tiles, remat {result['remat']}, {result['dtype']}, "
              f"{result['devices']} x {result['device_kind']}: {result['step_s']} s/step, "
              f"{result['tiles_per_s']} tiles/s, {result['slides_per_s']} slides/s "
              f"(compile + first step {result['compile_step_s']} s)")
    return 0
