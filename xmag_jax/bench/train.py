"""`python -m xmag_jax.bench train --config configs/debug.py [--json] [--steps N] [--config.KEY=VALUE]`.

    python -m xmag_jax.bench train --config configs/debug.py --config.data.views=2 \
        --config.loss.projector_norm=batch     # XMAG's two views and BatchNorm heads

Times the jitted distillation step alone (the input pipeline has its own benchmark, `bench input`):
random uint8 batches of the config's global shape are put on the mesh beforehand, the first step
(compile) is timed separately, then each of `--steps` steps is timed to completion. Reports the median
step time (s), pairs/s (and views/s with `data.views` > 1), model TFLOP/s over all devices (the FLOP model
counts every view) and MFU against the device's peak (`xmag_jax.chips`; n/a on a CPU unless the config's
`peak_tflops_per_device` is given).
The teacher is the config's (its checkpoint must exist, or use `--config.teacher.checkpoint=
--config.teacher.allow_random_teacher=True` for a random one). `--teacher_cache` also times the step that
trains from a teacher-target cache (random float32 targets in the batch, no teacher) and prints the speed-up.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import jax
import numpy as np
from absl import flags

from xmag_jax import chips, cli, errors, sharding
from xmag_jax.distill import config_validation
from xmag_jax.distill import step as step_lib
from xmag_jax.distill.metrics import Throughput


def _define(values: flags.FlagValues) -> None:
    flags.DEFINE_integer("steps", 10, "Timed steps after the compile step.", flag_values=values)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", flag_values=values)
    flags.DEFINE_bool("teacher_cache", False, "Also time the step that trains from cached teacher targets "
                      "(data.teacher_cache: random targets of the cache's shapes in the batch, no teacher), and "
                      "report the ratio.", flag_values=values)


COMMAND = cli.Command("python -m xmag_jax.bench train", _define, doc=__doc__, required=("config",),
                      config=(None, "Config file (configs/NAME.py[:ARG])."))


def _flags(argv: list[str]) -> flags.FlagValues:
    values, _ = COMMAND.parse(argv)
    if values.steps < 1:
        raise errors.UserError(f"--steps must be >= 1, got {values.steps}")
    return values


def _random_batch(trainer: step_lib.Trainer, rng: np.random.Generator) -> dict[str, jax.Array]:
    """Global batch in the step's shardings (each device is given only its own shard): random uint8 images,
    random normal float32 targets."""
    batch = {}
    for key, abstract in trainer.abstract_batch().items():
        if abstract.dtype == np.uint8:
            host = rng.integers(0, 256, size=abstract.shape, dtype=np.uint8)
        else:
            host = rng.standard_normal(abstract.shape, dtype=np.float32)
        batch[key] = jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                                   lambda index, host=host: host[index])
    return batch


def run(config, steps: int) -> dict:
    config_validation.check_schema(config)
    config_validation.check_values(config)
    mesh = sharding.make_mesh(config.mesh)
    config_validation.check_against_mesh(config, mesh)
    trainer = step_lib.make_trainer(config, mesh)
    state = trainer.init_state(jax.random.key(config.seed))
    teacher = trainer.teacher_state()
    batch = _random_batch(trainer, np.random.default_rng(config.seed))

    start = time.perf_counter()
    state, metrics = trainer.step(state, teacher, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.step(state, teacher, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    flops = trainer.flops_per_step()
    median = statistics.median(times)
    peak = chips.peak_flops_per_device(jax.devices(), config.get("peak_tflops_per_device"))
    rates = Throughput(batch_size=config.batch_size, flops_per_step=flops.total,
                       peak_flops_per_device=peak, device_count=jax.device_count(), views=trainer.views).rates(median)
    return {
        "benchmark": "train",
        "teacher": config.teacher.name,
        "student": config.student.name,
        "batch_size": config.batch_size,
        "views": trainer.views,
        "projector_norm": config.loss.projector_norm,
        "grad_accum": config.optim.grad_accum,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "timed_steps": steps,
        "first_step_s": compile_s,
        "step_time_s_median": median,
        "step_time_s_min": min(times),
        "step_time_s_max": max(times),
        "pairs_per_s": rates["pairs_per_s"],
        "views_per_s": rates.get("views_per_s", rates["pairs_per_s"]),
        "model_tflop_per_step": flops.total / 1e12,
        "model_tflops_per_s": rates["model_tflops_per_s"],
        "mfu": rates.get("mfu"),
        "peak_tflops_per_device": None if peak is None else peak / 1e12,
        "teacher_cache": trainer.cached,
    }


def _print(result: dict) -> None:
    print(f"train step ({result['teacher']} -> {result['student']}, batch {result['batch_size']} pairs x "
          f"{result['views']} views, projector_norm {result['projector_norm']}, "
          f"{result['devices']} x {result['device_kind']}, mesh {result['mesh']}"
          f"{', cached teacher targets' if result['teacher_cache'] else ''}):")
    print(f"  first step (compile) {result['first_step_s']:.2f} s; median step {result['step_time_s_median']:.4f} s "
          f"over {result['timed_steps']} steps (min {result['step_time_s_min']:.4f}, max "
          f"{result['step_time_s_max']:.4f})")
    print(f"  {result['pairs_per_s']:.2f} pairs/s ({result['views_per_s']:.2f} views/s), "
          f"{result['model_tflops_per_s']:.4g} model TFLOP/s "
          f"({result['model_tflop_per_step']:.4g} TFLOP/step), " +
          (f"MFU {100 * result['mfu']:.2f}% of {result['peak_tflops_per_device']:.0f} TFLOP/s/device"
           if result["mfu"] is not None else f"MFU n/a on {result['device_kind']} (no known peak)"))


def main(argv: list[str]) -> int:
    values = _flags(argv)
    result = run(values.config, values.steps)
    results = [result]
    if values.teacher_cache:
        cached = copy.deepcopy(values.config)
        with cached.unlocked():
            cached.data.teacher_cache = "CACHE"  # the step only: its batch brings random targets, no cache is read
        results.append(run(cached, values.steps))
        speedup = result["step_time_s_median"] / results[1]["step_time_s_median"]
    if values.json:
        print(json.dumps(result if len(results) == 1 else
                         {"live": result, "cached": results[1], "cached_speedup": speedup}))
        return 0
    for r in results:
        _print(r)
    if len(results) > 1:
        print(f"  cached teacher targets: {speedup:.2f}x the live step's pairs/s")
    return 0
