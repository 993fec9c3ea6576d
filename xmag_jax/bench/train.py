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
`--vs_torch` also times the same step in PyTorch + timm, eager (`vs_torch.TorchStep`: same sizes, same
initial weights, same batch, `--torch_threads` intra-op threads, default the CPUs this process may use as
XLA's CPU client does), alternating JAX and torch steps, and prints both medians, both losses of the first
and last step and the ratio torch step time / JAX step time.
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
    flags.DEFINE_bool("vs_torch", False, "Also time the same step in PyTorch + timm, eager "
                      "(xmag_jax/bench/vs_torch.py; torch is a test extra), alternating with the JAX step, and "
                      "report torch step time / JAX step time.", flag_values=values)
    flags.DEFINE_integer("torch_threads", None, "torch's intra-op threads with --vs_torch (default: the CPUs "
                         "this process may use, as XLA's CPU client).", flag_values=values)


COMMAND = cli.Command("python -m xmag_jax.bench train", _define, doc=__doc__, required=("config",),
                      config=(None, "Config file (configs/NAME.py[:ARG])."))


def _flags(argv: list[str]) -> flags.FlagValues:
    values, _ = COMMAND.parse(argv)
    if values.steps < 1:
        raise errors.UserError(f"--steps must be >= 1, got {values.steps}")
    if values.vs_torch and values.teacher_cache:
        raise errors.UserError("--vs_torch and --teacher_cache: give one of them")
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


def _setup(config):
    """(trainer, mesh, step-0 state, teacher parameters, random batch) for `config`."""
    config_validation.check_schema(config)
    config_validation.check_values(config)
    mesh = sharding.make_mesh(config.mesh)
    config_validation.check_against_mesh(config, mesh)
    trainer = step_lib.make_trainer(config, mesh)
    state = trainer.init_state(jax.random.key(config.seed))
    teacher = trainer.teacher_state()
    batch = _random_batch(trainer, np.random.default_rng(config.seed))
    return trainer, mesh, state, teacher, batch


def _timed(fn, *args) -> tuple[float, object]:
    """Seconds `fn(*args)` took to finish (its JAX results ready), and what it returned."""
    seconds, _, out = _timed_cpu(fn, *args)
    return seconds, out


def _timed_cpu(fn, *args) -> tuple[float, float, object]:
    """Wall seconds and this process's CPU seconds (all threads) of `fn(*args)`, and what it returned."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def run(config, steps: int) -> dict:
    trainer, mesh, state, teacher, batch = _setup(config)
    compile_s, (state, _) = _timed(trainer.step, state, teacher, batch)
    times = []
    for _ in range(steps):
        seconds, (state, _) = _timed(trainer.step, state, teacher, batch)
        times.append(seconds)
    return _result(config, trainer, mesh, compile_s, times)


def run_vs_torch(config, steps: int, threads: int) -> dict:
    """The JAX step and the PyTorch+timm eager step (`vs_torch.TorchStep`) from the same weights on the same
    batch, timed alternately (JAX, torch, JAX, ...) so a shared machine's load affects both alike."""
    from xmag_jax.bench import vs_torch

    torch = vs_torch.require_torch()
    vs_torch.check_supported(config)
    trainer, mesh, state, teacher, batch = _setup(config)
    ref = vs_torch.TorchStep(trainer, state, teacher, steps=steps + 1, threads=threads)  # before `state` is donated
    torch_batch = vs_torch.to_torch_batch(batch)
    compile_s, (state, jax_first) = _timed(trainer.step, state, teacher, batch)
    torch_first_s, torch_first = _timed(ref.step, torch_batch)
    times = {"jax": [], "torch": []}
    cpu = {"jax": [], "torch": []}
    for _ in range(steps):
        seconds, cpu_s, (state, jax_last) = _timed_cpu(trainer.step, state, teacher, batch)
        times["jax"].append(seconds)
        cpu["jax"].append(cpu_s)
        seconds, cpu_s, torch_last = _timed_cpu(ref.step, torch_batch)
        times["torch"].append(seconds)
        cpu["torch"].append(cpu_s)
    result = _result(config, trainer, mesh, compile_s, times["jax"])
    result["cpu_s_median"] = statistics.median(cpu["jax"])
    torch_median = statistics.median(times["torch"])
    result["torch"] = {
        "version": torch.__version__, "threads": threads, "first_step_s": torch_first_s,
        "step_time_s_median": torch_median, "step_time_s_min": min(times["torch"]),
        "step_time_s_max": max(times["torch"]), "pairs_per_s": config.batch_size / torch_median,
        "cpu_s_median": statistics.median(cpu["torch"]),
        "first_loss": torch_first["loss/total"], "last_loss": torch_last["loss/total"],
    }
    result["jax_first_loss"] = float(jax_first["loss/total"])
    result["jax_last_loss"] = float(jax_last["loss/total"])
    result["torch_over_jax"] = torch_median / result["step_time_s_median"]
    result["torch_over_jax_cpu"] = result["torch"]["cpu_s_median"] / result["cpu_s_median"]
    return result


def _result(config, trainer: step_lib.Trainer, mesh, compile_s: float, times: list[float]) -> dict:
    steps = len(times)
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


def _print_vs_torch(result: dict) -> None:
    _print(result)
    t = result["torch"]
    print(f"  torch {t['version']} eager ({t['threads']} threads): first step {t['first_step_s']:.2f} s; median step "
          f"{t['step_time_s_median']:.4f} s over {result['timed_steps']} steps (min {t['step_time_s_min']:.4f}, "
          f"max {t['step_time_s_max']:.4f}); {t['pairs_per_s']:.2f} pairs/s")
    print(f"  loss/total from the same weights and batch: step 0 jax {result['jax_first_loss']:.6f} torch "
          f"{t['first_loss']:.6f}; step {result['timed_steps']} jax {result['jax_last_loss']:.6f} torch "
          f"{t['last_loss']:.6f}")
    print(f"  process CPU time per step (all threads; steadier than wall time on a shared machine): jax "
          f"{result['cpu_s_median']:.4f} s, torch {t['cpu_s_median']:.4f} s, torch/JAX "
          f"{result['torch_over_jax_cpu']:.2f}x")
    print(f"  torch step time / JAX step time: {result['torch_over_jax']:.2f}x")


def main(argv: list[str]) -> int:
    values = _flags(argv)
    if values.vs_torch:
        threads = values.torch_threads
        if threads is None:
            from xmag_jax.bench.vs_torch import default_threads

            threads = default_threads()
        result = run_vs_torch(values.config, values.steps, threads)
        if values.json:
            print(json.dumps(result))
        else:
            _print_vs_torch(result)
        return 0
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
