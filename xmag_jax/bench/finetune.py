"""`python -m xmag_jax.bench finetune [--config configs/mil_e2e_debug.py] [--model vit_test] [--patch_px 224]`.

Times the jitted end-to-end training step (student forward/backward with the config's remat and dtype, the
GatedABMIL head, AdamW groups) on random uint8 tiles already on the mesh: the first step (compile) apart,
then the median of `--steps` steps. Reports tiles/s and slides/s (`slides_per_step x tiles_per_slide` tiles
per step). The student is randomly initialised from the registry (`--model`), so no checkpoint is needed.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import flags

from xmag_jax import cli, errors, models, sharding
from xmag_jax.finetune import model as model_lib


def _define(values: flags.FlagValues) -> None:
    flags.DEFINE_string("model", "vit_test", "Registry name of the student.", flag_values=values)
    flags.DEFINE_integer("patch_px", 224, "Tile side, px.", flag_values=values)
    flags.DEFINE_integer("steps", 5, "Timed steps after the compile step.", flag_values=values)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", flag_values=values)


COMMAND = cli.Command("python -m xmag_jax.bench finetune", _define, doc=__doc__,
                      config=("configs/mil_e2e_debug.py", "Finetune config file."))


def _flags(argv: list[str]) -> flags.FlagValues:
    values, _ = COMMAND.parse(argv)
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


def main(argv: list[str]) -> int:
    values = _flags(argv)
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
