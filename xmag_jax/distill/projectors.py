"""Projector heads mapping student features to the teacher's widths, and the trainable distillation model.

Trainable = the 5x student ViT plus up to three projectors (only those whose loss term is active):
- `global_proj`: student pooled embedding `[B, Ds]` -> teacher embedding `[B, Et]`;
- `tile_proj`: mean of each 4x4-field token block `[B, 16, Ds]` -> teacher tile embeddings `[B, 16, Et]`;
- `token_proj`: student tokens `[B, G, G, Ds]` -> teacher patch-token width `[B, G, G, Dt]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xmag_jax.distill import losses
from xmag_jax.models.vit import VisionTransformer


def _param(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class Projector(nnx.Module):
    """Two-layer MLP `Linear(d_in, hidden) -> GELU -> Linear(hidden, d_out)` on the last axis, in float32."""

    def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs):
        kernel = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros_init()
        self.fc1 = nnx.Linear(d_in, hidden, kernel_init=_param(kernel, "embed", "mlp"),
                              bias_init=_param(zeros, "mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d_out, kernel_init=_param(kernel, "mlp", "embed"),
                              bias_init=_param(zeros, "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class DistillModel(nnx.Module):
    """The student plus the projectors of the active loss terms; `model(images)` -> `losses.Predictions`.

    student_embed_dim Ds, teacher_embed_dim Et (the teacher's embedding users take), teacher_token_dim Dt
    (the teacher's patch-token width); `images` are normalised float `[B, H, W, 3]`. The student computes in
    its own dtype; its outputs are taken to float32 before pooling and projection.
    """

    def __init__(self, student: VisionTransformer, *, student_embed_dim: int, teacher_embed_dim: int,
                 teacher_token_dim: int, hidden: int, weights: losses.LossWeights, rngs: nnx.Rngs):
        self.student = student
        d = student_embed_dim
        self.global_proj = Projector(d, hidden, teacher_embed_dim, rngs=rngs) if weights.use_global else None
        self.tile_proj = Projector(d, hidden, teacher_embed_dim, rngs=rngs) if weights.tile > 0 else None
        self.token_proj = Projector(d, hidden, teacher_token_dim, rngs=rngs) if weights.token > 0 else None

    def __call__(self, images: jax.Array) -> losses.Predictions:
        out = self.student(images)
        pooled, patches = out.pooled.astype(jnp.float32), out.patches.astype(jnp.float32)
        return losses.Predictions(
            global_=self.global_proj(pooled) if self.global_proj is not None else None,
            tiles=self.tile_proj(losses.student_tile_blocks(patches)) if self.tile_proj is not None else None,
            tokens=self.token_proj(patches) if self.token_proj is not None else None,
        )
