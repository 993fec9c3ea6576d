"""`python -m xmag_jax.bench forward --model vit_s14 --batch 32 [--iters N]`: inference throughput of the
jit-compiled Flax forward vs timm's eager forward (torch.inference_mode) on the same CPU, in images/s.

Both models are randomly initialised (speed does not depend on the values); medians over `--iters`
timed batches (the two alternate) after warm-up and, for Flax, compilation.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from xmag_jax import cli
from xmag_jax.models.registry import ARCHS, create_model, embed, get_arch


def _interleaved_medians(fns: dict, iters: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them so a shared machine's load
    affects both alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("model", "vit_s14", sorted(ARCHS), "registry name", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "images per forward", flag_values=fv)
    flags.DEFINE_integer("iters", 5, "timed forwards of each framework", flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "untimed forwards first", flag_values=fv)
    flags.DEFINE_integer("img_size", None, "image side, px (default: the architecture's native size)",
                         flag_values=fv)


COMMAND = cli.Command("python -m xmag_jax.bench forward", _define, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)

    import timm
    import torch

    arch = get_arch(args.model)
    size = args.img_size or arch.vit.img_size
    x = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)

    model = create_model(args.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    flax_fwd = jax.jit(lambda s, images: embed(arch, nnx.merge(graphdef, s)(images)))
    x_jax = jax.device_put(x)
    t0 = time.perf_counter()
    flax_fwd(state, x_jax).block_until_ready()
    compile_s = time.perf_counter() - t0
    tmodel = timm.create_model(arch.timm_arch, **arch.timm_kwargs).eval()
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def timm_fwd():
        with torch.inference_mode():
            tmodel(x_torch)

    medians = _interleaved_medians(
        {"flax": lambda: flax_fwd(state, x_jax).block_until_ready(), "timm": timm_fwd}, args.iters, args.warmup)
    flax_s, timm_s = medians["flax"], medians["timm"]

    print(f"forward {args.model}: batch {args.batch}, {size} px, fp32, median of {args.iters} iters; "
          f"jax {jax.default_backend()} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"flax jit    {flax_s * 1e3:9.1f} ms/batch  {args.batch / flax_s:8.1f} images/s  (compile {compile_s:.1f} s)")
    print(f"timm eager  {timm_s * 1e3:9.1f} ms/batch  {args.batch / timm_s:8.1f} images/s")
    print(f"ratio flax/timm images/s: {timm_s / flax_s:.2f}")
    return 0
