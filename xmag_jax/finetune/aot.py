r"""Does an end-to-end step fit a TPU slice? Compile-only, on a host without a TPU (libtpu's devices).

    python -m xmag_jax.finetune.aot [--config configs/mil_e2e.py] [--model vit_b14] \
        [--topology v5p-8 --topology v6e-8] [--tiles 1024 --tiles 2048 --tiles 4096] [--json]

For each topology and `tiles_per_slide`, compiles the training step of `--model` (randomly initialised:
only shapes matter) with the config's dtype, remat and freezing at one slide per chip per step
(`slides_per_step` = chips, tiles sharded over the data axis), and reports HBM per chip (arguments +
outputs - aliases + temporaries + code: `xmag_jax.aot.compile.Memory`), whether it fits the chip's usable
HBM, XLA's FLOPs per chip and the projected slides/s at `--mfu` of the chip's peak bf16 FLOP/s.
"""

from __future__ import annotations

import copy
import json

import jax
import ml_collections
from absl import flags
from flax import nnx

from xmag_jax import cli, errors, geometry, models, sharding, topologies
from xmag_jax.aot import compile as compile_lib
from xmag_jax.finetune import model as model_lib

GiB = topologies.GiB

PROG = "python -m xmag_jax.finetune.aot"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", "vit_b14", "Registry name of the student (xmag_vitb14 = vit_b14 layout).",
                        flag_values=fv)
    flags.DEFINE_multi_string("topology", ["v5p-8", "v6e-8"], "Cloud TPU topology names.", flag_values=fv)
    flags.DEFINE_multi_integer("tiles", [1024, 2048, 4096], "tiles_per_slide values.", flag_values=fv)
    flags.DEFINE_integer("patch_px", geometry.TILE_PX, "Tile side, px.", flag_values=fv)
    flags.DEFINE_float("mfu", compile_lib.DEFAULT_MFU, "Assumed model FLOPs utilisation for the projection.",
                       flag_values=fv)
    flags.DEFINE_bool("json", False, "One JSON line per report instead of text.", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, config=("configs/mil_e2e.py", "Finetune config file."))


def compile_report(config: ml_collections.ConfigDict, model: str, topo: topologies.Topology, tiles: int,
                   patch_px: int = geometry.TILE_PX, mfu: float = compile_lib.DEFAULT_MFU,
                   devices: list | None = None) -> dict:
    """Compile one step for `topo` at `tiles` tiles per slide, one slide per chip; the report as a dict."""
    devices = topologies.compile_devices(topo) if devices is None else devices
    config = copy.deepcopy(config)
    with config.unlocked():
        config.train.slides_per_step, config.train.tiles_per_slide = len(devices), tiles
        config.mesh.data, config.mesh.fsdp = -1, 1
    cfg = config
    mesh = sharding.make_mesh(cfg.mesh, devices)
    arch = models.get_arch(model, dtype=cfg.model.dtype, remat=bool(cfg.model.remat))
    abstract = nnx.eval_shape(lambda: model_lib.random_model(cfg, arch, 2, 0))
    graphdef, trainable, frozen, rest = model_lib.split(
        abstract, model_lib.trainable_filter(arch.vit.depth, cfg.model.freeze_blocks))
    tx = model_lib.optimizer(cfg, trainable, arch.vit.depth, total_steps=1000)
    fns = model_lib.make_functions(graphdef, arch, tx, mesh)
    opt_state = jax.eval_shape(tx.init, trainable)
    s, a = cfg.train.slides_per_step, cfg.train.grad_accum
    images = jax.ShapeDtypeStruct((a, s // a * tiles, patch_px, patch_px, 3), "uint8")
    mask = jax.ShapeDtypeStruct((a, s // a, tiles), "bool")
    labels = jax.ShapeDtypeStruct((a, s // a), "int32")
    key = jax.eval_shape(lambda: jax.random.key(0))
    report = {"topology": topo.name, "chips": len(devices), "model": model, "tiles_per_slide": tiles,
              "slides_per_step": s, "remat": bool(cfg.model.remat), "dtype": cfg.model.dtype,
              "freeze_blocks": cfg.model.freeze_blocks, "usable_hbm_gib": topo.chip.usable_hbm_bytes / GiB}
    compiled, error, seconds = compile_lib.compile_within_hbm(
        lambda: fns.train_step.lower(trainable, opt_state, frozen, rest, images, mask, labels, key))
    if compiled is None:
        report.update(fits=False, compile_s=round(seconds, 1), error=error[:300])
        return report
    mem = compile_lib.Memory.of(compiled)
    flops, _ = compile_lib.cost(compiled)
    step_s = flops / (topo.chip.peak_bf16_flops * mfu) if flops else float("nan")
    report.update(fits=mem.total <= topo.chip.usable_hbm_bytes, hbm_gib_per_chip=round(mem.total / GiB, 2),
                  temp_gib=round(mem.temp / GiB, 2), flops_per_chip=flops, mfu=mfu,
                  projected_step_s=round(step_s, 3), projected_slides_per_s=round(s / step_s, 2),
                  compile_s=round(seconds, 1))
    return report


def format_report(r: dict) -> str:
    head = (f"{r['model']} on {r['topology']} ({r['chips']} chips), {r['slides_per_step']} slides x "
            f"{r['tiles_per_slide']} tiles, remat {r['remat']}, {r['dtype']}: ")
    if "hbm_gib_per_chip" not in r:
        return head + f"does NOT fit ({r['error']})"
    return head + (f"{'fits' if r['fits'] else 'does NOT fit'}, {r['hbm_gib_per_chip']} GiB/chip of "
                   f"{r['usable_hbm_gib']:.1f}; projected {r['projected_slides_per_s']} slides/s "
                   f"({r['projected_step_s']} s/step at MFU {r['mfu']}); compile {r['compile_s']} s")


def main(argv: list[str] | None = None) -> int:
    fv, _ = COMMAND.parse(argv)
    for name in fv.topology:
        topo = topologies.parse(name)
        devices = topologies.compile_devices(topo)
        for tiles in fv.tiles:
            r = compile_report(fv.config, fv.model, topo, tiles, fv.patch_px, fv.mfu, devices)
            print(json.dumps(r) if fv.json else format_report(r), flush=True)
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
