"""Model FLOPs of one distillation step, from the architectures (for MFU and the AOT report).

Counted as in the PaLM/MaxText MFU convention: matmul FLOPs only (2 per multiply-add), no remat
recomputation, no norms/softmax/elementwise. For one ViT image with T = (img/p)² + prefix tokens,
width D, depth L, MLP fc1 width H (fc2 input H, or H/2 for SwiGLU-packed):

    forward = 2·(img/p)²·(p²·3·D)                     patch embedding
            + 2·T·L·(3D² + D² + D·H + H_in·D)         qkv, proj, fc1, fc2
            + 4·T²·D·L                                attention scores (QKᵀ) and weighted values (AV)

One step over a global batch of B pairs in V augmented views (`data.views`) = teacher forward on 16·B·V tiles
+ 3 × (student forward on B·V images)  (backward = 2 × forward)
+ 3 × 2·(Ds·h + h·Eout) per projected vector (B·V global, 16·B·V tile blocks, G²·B·V tokens).
The projectors' BatchNorm (`loss.projector_norm="batch"`) is elementwise and not counted.
"""

from __future__ import annotations

import dataclasses

from xmag_jax import geometry
from xmag_jax.distill import losses
from xmag_jax.models import registry
from xmag_jax.models.vit import ViTConfig


def vit_forward_flops(cfg: ViTConfig, img_size: int | None = None) -> float:
    """Forward matmul FLOPs of one `[img, img, 3]` image (img defaults to cfg.img_size, px)."""
    img = cfg.img_size if img_size is None else img_size
    d, layers, h = cfg.embed_dim, cfg.depth, cfg.mlp_hidden
    h_in = h // 2 if cfg.mlp_layer == "swiglu_packed" else h
    patches = (img // cfg.patch_size) ** 2
    tokens = patches + cfg.num_prefix_tokens
    patch_embed = 2 * patches * cfg.patch_size**2 * 3 * d
    dense = 2 * tokens * layers * (4 * d * d + d * h + h_in * d)
    attention = 4 * tokens**2 * d * layers
    return float(patch_embed + dense + attention)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step (one global batch) by part; `total` is what MFU divides by time."""

    teacher_forward: float
    student_forward_backward: float
    projectors_forward_backward: float

    @property
    def total(self) -> float:
        return self.teacher_forward + self.student_forward_backward + self.projectors_forward_backward


def step_flops(config, global_batch: int | None = None) -> StepFlops:
    """Model FLOPs of one step of `config` over `global_batch` pairs (default `config.batch_size`), each pair
    in `data.views` views."""
    b = int(config.batch_size if global_batch is None else global_batch) * int(config.data.get("views", 1))
    teacher = registry.get_arch(config.teacher.name)
    student = registry.get_arch(config.student.name)
    weights = losses.LossWeights.from_config(config.loss)
    ds, hidden, grid = student.vit.embed_dim, int(config.loss.projector_hidden), student.vit.grid_size
    mlp = lambda d_out: 2 * (ds * hidden + hidden * d_out)  # noqa: E731  (one projected vector, forward)
    proj = 0.0
    if weights.use_global:
        proj += b * mlp(teacher.embed_dim)
    if weights.tile > 0:
        proj += geometry.FIELD_TILES * b * mlp(teacher.embed_dim)
    if weights.token > 0:
        proj += grid**2 * b * mlp(teacher.vit.embed_dim)
    return StepFlops(
        teacher_forward=geometry.FIELD_TILES * b * vit_forward_flops(teacher.vit),
        student_forward_backward=3 * b * vit_forward_flops(student.vit),
        projectors_forward_backward=3 * proj,
    )
