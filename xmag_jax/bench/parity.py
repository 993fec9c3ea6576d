"""`python -m xmag_jax.bench parity --model uni2_h [--full] [--img_size 224]`: build the timm model (full
depth with --full, else `--depth`, default 2, at full width), randomise it, convert it to Flax in memory
(the same table as `xmag_jax.convert import`), and print the max abs difference of the embedding and the
patch tokens, with the time each side took.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from xmag_jax import cli
from xmag_jax.models.registry import ARCHS, embed, get_arch

LAYER_SCALES = ("gamma", "lambda1")  # timm's LayerScale, transformers Dinov2's
TOKENS = ("cls_token", "reg_token", "pos_embed", "mask_token", "position_embeddings")


def randomize_init_constants_(model, seed: int = 0) -> None:
    """In place: give what timm or transformers initialise to constants (LayerScale 1e-5 or 1, norms, biases,
    tokens) random values so every parameter matters numerically in a parity check."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            leaf = name.rpartition(".")[2]
            if leaf in LAYER_SCALES:
                p.copy_(0.3 * noise)
            elif "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * noise)
            elif leaf == "bias" or leaf in TOKENS:
                p.copy_(0.2 * noise)


def timm_embedding(arch, model, feats) -> np.ndarray:
    """The registry embedding computed from timm's `forward_features` output `[B, N, D]`."""
    import torch

    if arch.embedding == "cls_mean_patch":
        return torch.cat([feats[:, 0], feats[:, model.num_prefix_tokens:].mean(1)], -1).numpy()
    return model.forward_head(feats, pre_logits=True).numpy()


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("model", "uni2_h", sorted(ARCHS), "registry name", flag_values=fv)
    flags.DEFINE_bool("full", False, "full depth (giant teachers need ~3x their fp32 size in RAM)", flag_values=fv)
    flags.DEFINE_integer("depth", 2, "blocks when not --full", flag_values=fv)
    flags.DEFINE_integer("img_size", 224, "image side, px", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "images per forward", flag_values=fv)


COMMAND = cli.Command("python -m xmag_jax.bench parity", _define, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)

    import timm
    import torch

    from xmag_jax.convert.timm_io import flax_from_state_dict

    arch = get_arch(args.model) if args.full else get_arch(args.model, depth=args.depth)
    t0 = time.perf_counter()
    tmodel = timm.create_model(arch.timm_arch, **arch.timm_kwargs).eval()
    randomize_init_constants_(tmodel)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in tmodel.parameters())

    t0 = time.perf_counter()
    state_dict = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    fmodel = flax_from_state_dict(arch, state_dict, source=f"timm {arch.timm_arch}")
    convert_s = time.perf_counter() - t0

    x = np.random.default_rng(0).normal(size=(args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        feats = tmodel.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        ref_embed = timm_embedding(arch, tmodel, feats)
    ref_patches = feats[:, tmodel.num_prefix_tokens:].numpy()
    timm_s = time.perf_counter() - t0

    graphdef, state = nnx.split(fmodel)
    fwd = jax.jit(lambda s, images: nnx.merge(graphdef, s)(images))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(state, x))
    flax_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(state, x))
    flax_s = time.perf_counter() - t0

    d_embed = float(np.abs(np.asarray(embed(arch, out)) - ref_embed).max())
    d_patch = float(np.abs(np.asarray(out.patches).reshape(ref_patches.shape) - ref_patches).max())
    print(f"parity {args.model}: depth {arch.vit.depth}{' (full)' if args.full else ''}, "
          f"{n_params / 1e6:.1f} M params, "
          f"batch {args.batch}, {args.img_size} px, fp32")
    print(f"max abs diff: embedding [{arch.embed_dim}] {d_embed:.3e}, patch tokens {d_patch:.3e}")
    print(f"timm: build+randomise {build_s:.1f} s, eager forward {timm_s:.2f} s")
    print(f"flax: convert {convert_s:.1f} s, jit forward {flax_s:.2f} s (first call with compile {flax_first_s:.1f} s)")
    return 0 if max(d_embed, d_patch) <= 1e-4 else 1
