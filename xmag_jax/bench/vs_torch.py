"""The distillation train step in PyTorch + timm, eager, for `python -m xmag_jax.bench train --vs_torch`.

    ref = TorchStep(trainer, state, teacher_params, steps=N, threads=2)  # before the JAX step donates `state`
    metrics = ref.step(to_torch_batch(batch))                            # {"loss/<term>": float, ...}

The same computation as `xmag_jax.distill.step` at the same sizes, from the same weights (converted with the
project's timm key table, `convert.mapping.to_timm`): the frozen teacher (timm, `teacher.dtype`) under
`torch.no_grad` on the 16 20x tiles of every pair and view, its targets (embedding mean, tile embeddings,
the tile-token mosaic average-pooled to the student grid) centred by running means when
`loss.center_targets`, the student (timm; `student.dtype` bfloat16 runs under CPU autocast) on the 5x
tiles, the projectors (Linear -> GELU tanh -> Linear, float32), the cosine / smooth-L1 terms, global-norm
clipping, AdamW with the step's weight-decay mask and learning-rate schedule, and the EMA student.
Not covered (`UnsupportedConfig`): BatchNorm projectors, gradient accumulation, teacher-target caches.

torch is a test extra: it is imported here only, and `require_torch` makes its absence a one-line error.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmag_jax.convert.mapping import to_timm
from xmag_jax.distill import losses
from xmag_jax.distill.optim import NO_DECAY_NAMES, ema_decay_schedule, learning_rate_schedule
from xmag_jax.errors import UserError
from xmag_jax.models.registry import Arch
from xmag_jax.models.vit import unstack_blocks

PROJECTORS = ("global_proj", "tile_proj", "token_proj")


class UnsupportedConfig(UserError):
    """A config option the PyTorch reference step does not implement."""


def require_torch():
    """The `torch` module, or a one-line `UserError` when torch or timm is not installed."""
    try:
        import timm  # noqa: F401
        import torch
    except ImportError as error:
        raise UserError(f"--vs_torch needs torch and timm (the 'test' extra: pip install -e '.[test]'): "
                        f"{error}") from error
    return torch


def default_threads() -> int:
    """The CPUs this process may run on: what XLA's CPU client sizes its intra-op thread pool to."""
    return len(os.sched_getaffinity(0))


def check_supported(config) -> None:
    if config.loss.get("projector_norm", "none") != "none":
        raise UnsupportedConfig("--vs_torch: loss.projector_norm must be 'none' (no BatchNorm heads in the torch step)")
    if int(config.optim.grad_accum) != 1:
        raise UnsupportedConfig("--vs_torch: optim.grad_accum must be 1")
    if config.data.get("teacher_cache"):
        raise UnsupportedConfig("--vs_torch: data.teacher_cache must be empty (the torch step runs the teacher)")


def to_torch_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """uint8 numpy/JAX arrays -> torch tensors (host copies)."""
    torch = require_torch()
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def _timm_model(arch: Arch, params: nnx.State, dtype):
    """timm model of `arch` holding `params` (a Flax ViT's `nnx.State`), its parameters in `dtype`."""
    import timm
    import torch

    pure = jax.tree.map(lambda x: np.asarray(x, np.float32), nnx.to_pure_dict(params))
    state_dict = to_timm(unstack_blocks(pure, arch.vit.depth))
    model = timm.create_model(arch.timm_arch, **arch.timm_kwargs)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    return model.to(dtype)


def _projector(params: nnx.State):
    """Linear -> GELU (tanh) -> Linear with the Flax projector's weights (kernels `[in, out]` transposed)."""
    import torch

    pure = nnx.to_pure_dict(params)
    linears = []
    for name in ("fc1", "fc2"):
        kernel = np.asarray(pure[name]["kernel"], np.float32)
        layer = torch.nn.Linear(*kernel.shape, bias="bias" in pure[name])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
            if "bias" in pure[name]:
                layer.bias.copy_(torch.from_numpy(np.array(pure[name]["bias"], np.float32)))
        linears.append(layer)
    return torch.nn.Sequential(linears[0], torch.nn.GELU(approximate="tanh"), linears[1])


def _cosine_distance(pred, target):
    """optax.losses.cosine_distance(epsilon=1e-12) averaged: `1 - cos` over the last axis, float32."""
    import torch

    def unit(x):
        return x / torch.sqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-24))

    return 1.0 - (unit(pred.float()) * unit(target.float())).sum(-1).mean()


class TorchStep:
    """The train step of `trainer`'s config in PyTorch, started from the JAX `state` and teacher parameters.

    `steps`: how many steps will run (the learning-rate and EMA schedules are tabulated up to it);
    `threads`: torch's intra-op threads (`torch.set_num_threads`).
    """

    def __init__(self, trainer, state, teacher_params: nnx.State, *, steps: int, threads: int):
        torch = require_torch()
        config = trainer.config
        check_supported(config)
        torch.set_num_threads(threads)
        self.torch = torch
        self.threads = threads
        self.student_arch, self.teacher_arch = trainer.student_arch, trainer.teacher_arch
        self.weights = trainer.weights
        self.center_momentum = float(config.loss.center_momentum)
        self.clip_norm = float(config.optim.clip_norm)
        self.autocast = trainer.student_arch.vit.dtype == "bfloat16"

        self.student = _timm_model(self.student_arch, state.params["student"], torch.float32).train()
        teacher_dtype = getattr(torch, trainer.teacher_arch.vit.dtype)
        self.teacher = _timm_model(self.teacher_arch, teacher_params, teacher_dtype).eval().requires_grad_(False)
        self.projectors = torch.nn.ModuleDict({name: _projector(state.params[name]) for name in PROJECTORS
                                               if name in state.params})
        self.center = (None if state.target_center is None else
                       {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.target_center.items()})
        modules = torch.nn.ModuleDict({"student": self.student, **self.projectors})
        decay, no_decay = [], []
        for name, p in modules.named_parameters():
            (no_decay if p.ndim < 2 or set(name.split(".")) & NO_DECAY_NAMES else decay).append(p)
        self.params = decay + no_decay
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(optim.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=(float(optim.b1), float(optim.b2)), eps=1e-8, fused=True)  # optax.adamw's eps
        count = jnp.arange(steps)
        self.lrs = np.asarray(jax.vmap(learning_rate_schedule(optim, int(config.total_steps)))(count), np.float64)
        self.ema_decays = np.asarray(jax.vmap(ema_decay_schedule(optim))(count), np.float64)
        self.ema = None
        if float(optim.ema_decay) > 0:
            self.ema = {name: p.detach().clone() for name, p in self.student.named_parameters()}
        self.count = 0

    def _normalize(self, images, arch: Arch, dtype):
        """uint8 `[N, H, W, 3]` -> normalised `[N, 3, H, W]` in `dtype` (a channels-last view, as timm takes)."""
        torch = self.torch
        mean = torch.tensor(arch.mean, dtype=torch.float32)
        std = torch.tensor(arch.std, dtype=torch.float32)
        x = (images.float() / 255.0 - mean) / std
        return x.to(dtype).permute(0, 3, 1, 2)

    def _forward(self, model, arch: Arch, images):
        """`(embedding [N, E], patch tokens [N, G, G, D])` of `model` on uint8 `[N, H, W, 3]`."""
        dtype = next(model.parameters()).dtype
        feats = model.forward_features(self._normalize(images, arch, dtype))
        patches = feats[:, model.num_prefix_tokens:]
        side = images.shape[1] // arch.vit.patch_size
        patches = patches.reshape(patches.shape[0], side, side, patches.shape[-1])
        if arch.embedding == "cls_mean_patch":
            return self.torch.cat([feats[:, 0], patches.mean((1, 2))], -1), patches
        return model.forward_head(feats, pre_logits=True), patches

    def _targets(self, tiles, grid: int) -> dict:
        """Teacher targets of uint8 `tiles [L, 16, H, W, 3]` (L = pairs x views), float32, as `losses.Targets`."""
        n = tiles.shape[0]
        with self.torch.no_grad():
            emb, patches = self._forward(self.teacher, self.teacher_arch, tiles.reshape(-1, *tiles.shape[2:]))
        emb = emb.float().reshape(n, losses.FIELD_TILES, -1)
        targets = {"global": emb.mean(1), "tiles": emb, "tokens": None}
        if self.weights.token > 0:
            side, gt, d = losses.FIELD_SIDE, patches.shape[1], patches.shape[-1]
            mosaic = patches.float().reshape(n, side, side, gt, gt, d).permute(0, 1, 3, 2, 4, 5)
            pool = side * gt // grid
            targets["tokens"] = mosaic.reshape(n, grid, pool, grid, pool, d).mean((2, 4))
        return targets

    def _center(self, targets: dict) -> dict:
        """Targets minus the running centers; the centers then move to this batch's means."""
        means = {"embedding": targets["tiles"].reshape(-1, targets["tiles"].shape[-1]).mean(0)}
        if targets["tokens"] is not None:
            means["token"] = targets["tokens"].reshape(-1, targets["tokens"].shape[-1]).mean(0)
        centered = {"global": targets["global"] - self.center["embedding"],
                    "tiles": targets["tiles"] - self.center["embedding"],
                    "tokens": None if targets["tokens"] is None else targets["tokens"] - self.center["token"]}
        m = self.center_momentum
        self.center = {k: means[k] if self.count == 0 else m * self.center[k] + (1 - m) * means[k] for k in means}
        return centered

    def _losses(self, images, targets: dict, grid: int) -> dict:
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            pooled, patches = self._forward(self.student, self.student_arch, images)
        pooled, patches = pooled.float(), patches.float()
        w, proj, terms = self.weights, self.projectors, {}
        total = torch.zeros(())
        if w.use_global:
            pred = proj["global_proj"](pooled)
            if w.global_cos > 0:
                terms["global"] = _cosine_distance(pred, targets["global"])
                total = total + w.global_cos * terms["global"]
            if w.global_smooth_l1 > 0:
                terms["global_smooth_l1"] = torch.nn.functional.smooth_l1_loss(pred, targets["global"], beta=1.0)
                total = total + w.global_smooth_l1 * terms["global_smooth_l1"]
        if w.tile > 0:
            n, g, _, d = patches.shape
            side = losses.FIELD_SIDE
            blocks = patches.reshape(n, side, g // side, side, g // side, d).mean((2, 4)).reshape(n, side * side, d)
            terms["tile"] = _cosine_distance(proj["tile_proj"](blocks), targets["tiles"])
            total = total + w.tile * terms["tile"]
        if w.token > 0:
            terms["token"] = _cosine_distance(proj["token_proj"](patches), targets["tokens"])
            total = total + w.token * terms["token"]
        terms["total"] = total
        return terms

    def step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on torch uint8 `image_5x [B, V, H, W, 3]`, `tiles_20x [B, V, 16, H, W, 3]`;
        returns the metrics the JAX step reports (`loss/<term>`, `grad_norm`, `lr`) as floats."""
        torch = self.torch
        images, tiles = batch["image_5x"], batch["tiles_20x"]
        images = images.reshape(-1, *images.shape[2:])
        grid = images.shape[1] // self.student_arch.vit.patch_size
        targets = self._targets(tiles.reshape(-1, *tiles.shape[2:]), grid)
        if self.center is not None:
            targets = self._center(targets)
        terms = self._losses(images, targets, grid)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
        lr = float(self.lrs[self.count])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in self.student.parameters()],
                                     1.0 - float(self.ema_decays[self.count]))
        self.count += 1
        metrics = {f"loss/{k}": v.item() for k, v in terms.items()}
        metrics.update(grad_norm=grad_norm.item(), lr=lr)
        return metrics
