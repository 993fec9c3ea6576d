"""The train state: a pytree of arrays, checkpointed as a whole and sharded leaf by leaf."""

from __future__ import annotations

import jax
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """step: int32 scalar, optimizer steps taken (one step = one global batch);
    params: `nnx.State` of the trainable `DistillModel` (`student`, `global_proj`, `tile_proj`, `token_proj`);
    opt_state: optax state over `params`;
    ema: `nnx.State` of the student's parameters averaged with `optim.ema_decay`, or None when disabled;
    target_center: running means of the teacher targets (`losses.target_means` keys, float32 `[Et]` /
    `[Dt]`, momentum `loss.center_momentum`) subtracted before the loss, or None when `loss.center_targets`
    is off;
    batch_stats: `nnx.State` of the projectors' BatchNorm running statistics (`loss.projector_norm="batch"`),
    or None without BatchNorm. Training-only, like the projectors: never exported.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State | None = None
    target_center: dict[str, jax.Array] | None = None
    batch_stats: nnx.State | None = None

    @property
    def student_params(self) -> nnx.State:
        """The student's parameters (`nnx.update(student, ...)`-able): the EMA ones when enabled."""
        return self.ema if self.ema is not None else self.params["student"]
