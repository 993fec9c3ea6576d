"""Projector heads mapping student features to the teacher's widths, and the trainable distillation model.

Trainable = the 5x student ViT plus up to three projectors (only those whose loss term is active):
- `global_proj`: student pooled embedding `[B, V, Ds]` -> teacher embedding `[B, V, Et]`;
- `tile_proj`: mean of each 4x4-field token block `[B, V, 16, Ds]` -> teacher tile embeddings `[B, V, 16, Et]`;
- `token_proj`: student tokens `[B, V, G, G, Ds]` -> teacher patch-token width `[B, V, G, G, Dt]`.
(B pairs, V augmented views of each, `data.views`.)

`loss.projector_norm` picks the head:
- `"none"`: `Linear(Ds, hidden) -> GELU (tanh approximation) -> Linear(hidden, Eout)`;
- `"batch"`: XMAG's head (`models/heads.py` `linearhead2`): `Linear(Ds, hidden) -> BatchNorm -> GELU (exact, erf;
  torch's nn.GELU) -> Linear(hidden, Eout)`, except that the first Linear has no bias: BatchNorm subtracts the
  batch mean, so that bias changes no output and gets a zero gradient, which AdamW would turn into noise steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xmag_jax.distill import losses
from xmag_jax.models.vit import VisionTransformer

PROJECTOR_NORMS = ("none", "batch")
# torch.nn.BatchNorm1d's defaults, which XMAG's heads use.
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # running <- (1 - momentum) * running + momentum * batch statistic


def _param(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class ViewBatchNorm(nnx.Module):
    """BatchNorm over the last axis of `[B, V, ..., D]` features, with statistics per view.

    Training normalises each view v by the mean and biased variance of `x[:, v]` over every axis but the
    last (the B pairs, and tiles/tokens where present): under one `jax.jit` over a batch sharded on B that
    mean is over the global batch (all devices and hosts), as synchronised BatchNorm gives XMAG. The running
    statistics (`nnx.BatchStat`, float32 `[D]`) move by `BATCH_NORM_MOMENTUM` towards the views' mean batch
    statistics, the variance unbiased (n / (n - 1)) as torch does; `use_running_average=True` normalises by
    them instead. Scale and bias are learnt (`nnx.Param`, 1 and 0 at init).
    """

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=("mlp",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), out_sharding=("mlp",), eager_sharding=False)
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array, *, use_running_average: bool = False) -> jax.Array:
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = (0, *range(2, x.ndim - 1))
            mean = x.mean(axis=axes, keepdims=True)
            var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
            n = x.size // (x.shape[1] * x.shape[-1])
            view_mean = mean.reshape(x.shape[1], -1).mean(axis=0)
            view_var = var.reshape(x.shape[1], -1).mean(axis=0) * (n / max(n - 1, 1))
            m = BATCH_NORM_MOMENTUM
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(view_mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(view_var)
        return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * self.scale[...] + self.bias[...]


class Projector(nnx.Module):
    """Two-layer MLP on the last axis of `[B, V, ..., d_in]`, in float32; `norm` in `PROJECTOR_NORMS` (see above)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, *, norm: str = "none", rngs: nnx.Rngs):
        if norm not in PROJECTOR_NORMS:
            raise ValueError(f"projector norm must be one of {PROJECTOR_NORMS}, got {norm!r}")
        kernel = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros_init()
        self.fc1 = nnx.Linear(d_in, hidden, use_bias=norm == "none", kernel_init=_param(kernel, "embed", "mlp"),
                              bias_init=_param(zeros, "mlp"), rngs=rngs)
        self.norm = ViewBatchNorm(hidden) if norm == "batch" else None
        self.fc2 = nnx.Linear(hidden, d_out, kernel_init=_param(kernel, "mlp", "embed"),
                              bias_init=_param(zeros, "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is None:
            return self.fc2(jax.nn.gelu(self.fc1(x)))
        return self.fc2(jax.nn.gelu(self.norm(self.fc1(x)), approximate=False))


class DistillModel(nnx.Module):
    """The student plus the projectors of the active loss terms; `model(images)` -> `losses.Predictions`.

    student_embed_dim Ds, teacher_embed_dim Et (the teacher's embedding users take), teacher_token_dim Dt
    (the teacher's patch-token width); `images` are normalised float `[B, V, H, W, 3]` (V views of each pair),
    run through the student as one batch of B·V images. The student computes in its own dtype; its outputs
    are taken to float32 before pooling and projection. Predictions are `[B, V, ...]`.
    """

    def __init__(self, student: VisionTransformer, *, student_embed_dim: int, teacher_embed_dim: int,
                 teacher_token_dim: int, hidden: int, weights: losses.LossWeights, rngs: nnx.Rngs,
                 norm: str = "none"):
        self.student = student
        d = student_embed_dim
        head = lambda d_out: Projector(d, hidden, d_out, norm=norm, rngs=rngs)  # noqa: E731
        self.global_proj = head(teacher_embed_dim) if weights.use_global else None
        self.tile_proj = head(teacher_embed_dim) if weights.tile > 0 else None
        self.token_proj = head(teacher_token_dim) if weights.token > 0 else None

    def __call__(self, images: jax.Array) -> losses.Predictions:
        b, v = images.shape[:2]
        out = self.student(images.reshape(b * v, *images.shape[2:]))
        pooled, patches = out.pooled.astype(jnp.float32), out.patches.astype(jnp.float32)
        per_view = lambda x: x.reshape(b, v, *x.shape[1:])  # noqa: E731
        return losses.Predictions(
            global_=self.global_proj(per_view(pooled)) if self.global_proj is not None else None,
            tiles=(self.tile_proj(per_view(losses.student_tile_blocks(patches)))
                   if self.tile_proj is not None else None),
            tokens=self.token_proj(per_view(patches)) if self.token_proj is not None else None,
        )
