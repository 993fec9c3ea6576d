"""The distillation train step: one `jax.jit` with explicit in/out shardings over a ('data', 'fsdp') mesh.

    trainer = make_trainer(config, mesh)
    state = trainer.init_state(jax.random.key(config.seed))
    teacher = trainer.teacher_state()
    state, metrics = trainer.step(state, teacher, batch)   # batch: numpy or global jax arrays

One step = one global batch of `config.batch_size` pairs, each in `data.views` augmented views V, split
into `optim.grad_accum` micro-batches (a `lax.scan`) whose gradients are averaged before one AdamW update.
Inputs are uint8; each architecture's own normalisation runs on device. The teacher (frozen, `teacher.dtype`)
runs on every view under `stop_gradient` and is never differentiated; gradients flow to the student and the
projectors only. Each view's student output is compared with the teacher on the same view and the loss is
the mean over views. With `data.teacher_cache` the teacher is not in the step at all: the batch brings each
view's cached targets (`xmag_jax.teacher_cache`) and the teacher argument is None. With
`loss.center_targets` the teacher targets are centred by running means kept in the state
(`losses.center_targets`); with `loss.projector_norm="batch"` the projectors' BatchNorm statistics are those
of each micro-batch (over all devices, per view) and their running means are kept in the state. The state is
donated.

`init_state` starts the student from `student.init` when set (a model checkpoint whose architecture
`validate` checks against `student.name` before anything is compiled).

Metrics (float32 scalars): `loss/<term>` for each active term and `loss/total`, `grad_norm` (before
clipping), `param_norm` (after the update), `lr` (the rate this update used).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from xmag_jax import sharding
from xmag_jax.distill import flops, losses
from xmag_jax.distill.config_validation import ConfigError
from xmag_jax.distill.optim import ema_decay_schedule, learning_rate_schedule, make_optimizer
from xmag_jax.distill.projectors import DistillModel
from xmag_jax.distill.state import TrainState
from xmag_jax.models import checkpoint as model_checkpoint
from xmag_jax.models import registry

TILE_PX = 224  # both magnifications' tiles are 224 px (5x: ~2.0 µm/px, 20x: ~0.5 µm/px)
STEP_BATCH_KEYS = ("image_5x", "tiles_20x")
# With data.teacher_cache: float32 `target_tiles [B, V, 16, Et]`, and `target_tokens [B, V, G, G, Dt]` when
# the token term is on, replace `tiles_20x`.
CACHED_BATCH_KEYS = ("image_5x", "target_tiles", "target_tokens")
# XLA's CPU compiler (jax 0.10) fuses the element-wise ops and reductions around a dot (attention's scale and
# softmax, bias + GELU) into the YNNPACK dot fusion; on the 2-core AVX (no AVX2) EPYC of our CI the debug step
# then costs ~20% more CPU time than with YNNPACK taking the dots and convolutions alone and XLA's own loop
# fusions the rest (`bench train --vs_torch`, see docs/design.md). Only the step on CPU devices is compiled so.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{t}" for t in ("DOT", "INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION"))}


def archs(config: ml_collections.ConfigDict) -> tuple[registry.Arch, registry.Arch]:
    """The (student, teacher) registry architectures with the config's compute options."""
    student = registry.get_arch(config.student.name, dtype=config.student.dtype, remat=bool(config.student.remat),
                                scan_layers=_scan(config.student))
    teacher = registry.get_arch(config.teacher.name, dtype=config.teacher.dtype, param_dtype=config.teacher.dtype,
                                scan_layers=_scan(config.teacher))
    return student, teacher


def teacher_forward_targets(teacher_arch: registry.Arch, teacher_graphdef: Any, with_tokens: bool,
                            teacher_params: nnx.State, tiles: jax.Array, grid: int) -> losses.Targets:
    """The loss's targets from the teacher on uint8 `tiles [*L, 16, H, W, 3]` (leading axes L: fields, or
    fields and views), tokens pooled to the student's G = `grid`; targets `[*L, ...]`."""
    lead = tiles.shape[:-3]
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    out = teacher(registry.normalize(teacher_arch, tiles.reshape(-1, *tiles.shape[-3:])))
    emb = registry.embed(teacher_arch, out).reshape(*lead, -1)
    patches = None
    if with_tokens:
        patches = out.patches.reshape(*lead, *out.patches.shape[1:])
    return losses.teacher_targets(emb, patches, grid)


def cached_targets(batch: dict[str, jax.Array]) -> losses.Targets:
    """The loss's targets from a cached batch (`CACHED_BATCH_KEYS`), as `losses.teacher_targets` builds them."""
    tiles = batch["target_tiles"].astype(jnp.float32)
    tokens = batch.get("target_tokens")
    return losses.Targets(global_=tiles.mean(axis=-2), tiles=tiles,
                          tokens=None if tokens is None else tokens.astype(jnp.float32))


def _scan(model_cfg: ml_collections.ConfigDict) -> bool:
    return bool(model_cfg.get("scan_layers", False))  # absent in configs saved before the key existed


def check_checkpoint_arch(key: str, path: str, arch: registry.Arch, name_key: str) -> None:
    """ConfigError naming `key` unless the model checkpoint `path` exists and holds `arch` (the model of the
    config's `name_key`), compute/parameter dtypes, remat and scanning aside."""
    try:
        saved = model_checkpoint.read_arch(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from error
    ignored = dict(dtype=arch.vit.dtype, param_dtype=arch.vit.param_dtype, remat=arch.vit.remat,
                   scan_layers=arch.vit.scan_layers)
    if dataclasses.replace(saved.vit, **ignored) != arch.vit:
        diff = {k: (v, getattr(arch.vit, k)) for k, v in saved.vit.to_dict().items()
                if k not in ignored and v != getattr(arch.vit, k)}
        raise ConfigError(f"{key}: {path} holds a {saved.name} whose architecture differs from "
                          f"{name_key}={arch.name!r}: {{field: (saved, expected)}} = {diff}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Model-geometry checks from the registry architectures, raised before anything is compiled.

    The student's G x G token grid must split into 4x4 field blocks (G % 4 == 0), and the teacher field
    mosaic (4·Gt per side) must average-pool onto it ((4·Gt) % G == 0), both for 224 px tiles. Value ranges
    and the files a run reads (`student.init` among them) are `config_validation`'s.
    """
    for key in ("student.name", "teacher.name"):
        name = config.student.name if key == "student.name" else config.teacher.name
        if name not in registry.ARCHS:
            raise ConfigError(f"{key}: unknown model {name!r}; known models: {', '.join(sorted(registry.ARCHS))}")
    student, teacher = archs(config)
    if config.student.get("layer_scale_init") is not None and not student.vit.init_values:
        raise ConfigError(f"student.layer_scale_init: is set but {student.name!r} has no LayerScale to initialise")
    if config.student.get("init") and config.student.get("layer_scale_init") is not None:
        raise ConfigError("student.layer_scale_init: is set together with student.init, whose LayerScale "
                          "gammas are the start; unset one of them")
    weights = losses.LossWeights.from_config(config.loss)
    for key, arch in (("student.name", student), ("teacher.name", teacher)):
        if TILE_PX % arch.vit.patch_size:
            raise ConfigError(f"{key}: {arch.name} patch size {arch.vit.patch_size} px does not divide "
                              f"the {TILE_PX} px tiles")
        if TILE_PX != arch.vit.img_size and not arch.vit.dynamic_img_size:
            raise ConfigError(f"{key}: {arch.name} takes {arch.vit.img_size} px images, tiles are {TILE_PX} px")
    g = TILE_PX // student.vit.patch_size
    gt = TILE_PX // teacher.vit.patch_size
    if weights.tile > 0 and g % losses.FIELD_SIDE:
        raise ConfigError(f"student.name: {student.name}'s {g}x{g} token grid does not split into "
                          f"{losses.FIELD_SIDE}x{losses.FIELD_SIDE} blocks for the tile-level loss")
    if weights.token > 0 and (losses.FIELD_SIDE * gt) % g:
        raise ConfigError(f"teacher.name: {teacher.name}'s field mosaic of {losses.FIELD_SIDE * gt}x"
                          f"{losses.FIELD_SIDE * gt} tokens does not average-pool onto the student grid {g}x{g} "
                          f"({student.name}) for the token-level loss")
    if config.optim.warmup_steps >= config.total_steps:
        raise ConfigError(f"optim.warmup_steps: {config.optim.warmup_steps} must be < total_steps "
                          f"{config.total_steps}")


@dataclasses.dataclass
class Trainer:
    """Everything the train loop and the AOT compiler need about the step; build with `make_trainer`.

    `state_shardings` / `teacher_shardings` / `batch_shardings` mirror `abstract_state()`,
    `abstract_teacher_state()` and the batch dict (`image_5x [B, V, 224, 224, 3]`, `tiles_20x
    [B, V, 16, 224, 224, 3]` uint8 with V = `data.views`, `record_index [B]` int64 — the last one is not
    used by the step). Batches are sharded over B only.
    `cached` (`data.teacher_cache` set): no teacher in the step (`teacher_shardings`, the abstract teacher
    and `teacher_state()` are None); the batch carries `target_tiles`/`target_tokens` instead of `tiles_20x`.
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    student_arch: registry.Arch
    teacher_arch: registry.Arch
    weights: losses.LossWeights
    graphdef: Any
    teacher_graphdef: Any
    state_shardings: Any
    teacher_shardings: Any
    batch_shardings: dict[str, NamedSharding]
    _abstract_state: Any
    _abstract_teacher: Any
    _init: Any
    _init_teacher: Any
    _step: Any
    cached: bool = False
    step_batch_keys: tuple[str, ...] = STEP_BATCH_KEYS

    def abstract_state(self) -> TrainState:
        """`TrainState` of `jax.ShapeDtypeStruct`s carrying `state_shardings` (no arrays allocated)."""
        return sharding.with_shardings(self._abstract_state, self.state_shardings)

    def abstract_teacher_state(self) -> nnx.State:
        """Teacher parameters as sharded `jax.ShapeDtypeStruct`s in `teacher.dtype` (a restore target)."""
        return sharding.with_shardings(self._abstract_teacher, self.teacher_shardings)

    @property
    def views(self) -> int:
        """Augmented views per pair (`data.views`; 1 in configs saved before the key existed)."""
        return int(self.config.data.get("views", 1))

    def abstract_batch(self, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        b, v = int(self.config.batch_size if global_batch is None else global_batch), self.views
        grid = TILE_PX // self.student_arch.vit.patch_size
        shapes = {"image_5x": (b, v, TILE_PX, TILE_PX, 3),
                  "tiles_20x": (b, v, losses.FIELD_TILES, TILE_PX, TILE_PX, 3),
                  "target_tiles": (b, v, losses.FIELD_TILES, self.teacher_arch.embed_dim),
                  "target_tokens": (b, v, grid, grid, self.teacher_arch.vit.embed_dim)}
        return {k: jax.ShapeDtypeStruct(shapes[k], jnp.uint8 if k in STEP_BATCH_KEYS else jnp.float32,
                                        sharding=self.batch_shardings[k]) for k in self.step_batch_keys}

    def init_state(self, rng: jax.Array) -> TrainState:
        """Step 0, created directly in its shardings: the student random (`rng`) or, with `student.init`, that
        checkpoint's parameters (the EMA starts from the same); projectors and optimizer state fresh."""
        state = self._init(rng)
        path = self.config.student.get("init")
        if not path:
            return state
        try:
            student = model_checkpoint.load_params(path, self.abstract_state().params["student"])
        except (OSError, ValueError) as error:
            raise ConfigError(f"student.init: {error}") from error
        params = state.params
        params["student"] = student
        ema = None if state.ema is None else jax.tree.map(jnp.copy, student)
        return state.replace(params=params, ema=ema)

    def teacher_state(self) -> nnx.State:
        """The frozen teacher's parameters on `teacher_shardings`: restored from `teacher.checkpoint`, or a
        seeded random init when the checkpoint is empty and `teacher.allow_random_teacher` is set; None with
        `data.teacher_cache`."""
        if self.cached:
            return None
        path = self.config.teacher.checkpoint
        if path:
            check_checkpoint_arch("teacher.checkpoint", path, self.teacher_arch, "teacher.name")
            return model_checkpoint.load_params(path, self.abstract_teacher_state())
        if not self.config.teacher.allow_random_teacher:
            raise ConfigError("teacher.checkpoint: empty, and teacher.allow_random_teacher is False")
        return self._init_teacher(jax.random.key(int(self.config.seed) + 1))

    def step(self, state: TrainState, teacher: nnx.State, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch; `state` is donated (do not reuse it)."""
        return self._step(state, teacher, {k: batch[k] for k in self.step_batch_keys})

    def lower(self, global_batch: int | None = None) -> jax.stages.Lowered:
        """The step lowered on abstract inputs (for `.compile()`, cost and memory analysis; no arrays)."""
        return self._step.lower(self.abstract_state(), self.abstract_teacher_state(),
                                self.abstract_batch(global_batch))

    def flops_per_step(self, global_batch: int | None = None) -> flops.StepFlops:
        counted = flops.step_flops(self.config, global_batch)
        return dataclasses.replace(counted, teacher_forward=0.0) if self.cached else counted

    def teacher_targets(self, teacher_params: nnx.State, tiles: jax.Array) -> losses.Targets:
        """What the live step's loss uses as targets for uint8 `tiles [*L, 16, 224, 224, 3]` (jittable)."""
        return teacher_forward_targets(self.teacher_arch, self.teacher_graphdef, self.weights.token > 0,
                                       teacher_params, tiles, TILE_PX // self.student_arch.vit.patch_size)


def _state_from_model(model: DistillModel, tx: optax.GradientTransformation, ema: bool,
                      center_dims: dict[str, int] | None, batch_norm: bool) -> TrainState:
    """Step 0: fresh optimizer state, EMA = the initial student, target centers zero for `center_dims`
    ({'embedding': Et, 'token': Dt}) or None, the projectors' BatchNorm running statistics (mean 0, var 1)
    when `batch_norm`. Step 0 (learning rate 0 under warmup) sets the centers to its batch's means; later
    steps move them with momentum `loss.center_momentum`."""
    params = nnx.state(model, nnx.Param)
    center = None if center_dims is None else {k: jnp.zeros((d,), jnp.float32) for k, d in center_dims.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params["student"]) if ema else None, target_center=center,
                      batch_stats=nnx.state(model, nnx.BatchStat) if batch_norm else None)


def _split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """`[B, ...]` -> `[accum, B / accum, ...]`; micro-batch a takes rows a, a + accum, ... so that every
    device's batch shard holds its own share of each micro-batch (no data movement)."""
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
    """Builds the step for `config` on `mesh`. Runs `validate(config)`; allocates nothing on devices."""
    validate(config)
    student_arch, teacher_arch = archs(config)
    weights = losses.LossWeights.from_config(config.loss)
    accum = int(config.optim.grad_accum)
    cached = bool(config.data.get("teacher_cache"))
    step_keys = STEP_BATCH_KEYS
    if cached:
        step_keys = CACHED_BATCH_KEYS if weights.token > 0 else CACHED_BATCH_KEYS[:2]
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % (dp * accum):
        raise ConfigError(f"batch_size: {config.batch_size} pairs does not divide by data-parallel size {dp} "
                          f"x optim.grad_accum {accum}")
    tx = make_optimizer(config.optim, int(config.total_steps))
    schedule = learning_rate_schedule(config.optim, int(config.total_steps))
    ema_decay = float(config.optim.ema_decay)
    ema_decay_at = ema_decay_schedule(config.optim)
    center_momentum = float(config.loss.center_momentum)
    projector_norm = config.loss.get("projector_norm", "none")  # absent in configs saved before the key existed
    center_dims = None
    if config.loss.center_targets:
        center_dims = {"embedding": teacher_arch.embed_dim}
        if weights.token > 0:
            center_dims["token"] = teacher_arch.vit.embed_dim

    def build_model(rng: jax.Array) -> DistillModel:
        rngs = nnx.Rngs(rng)
        layer_scale = config.student.get("layer_scale_init")  # absent in configs saved before the key existed
        overrides = {} if layer_scale is None else {"init_values": float(layer_scale)}
        student = registry.create_model(config.student.name, rngs=rngs, dtype=config.student.dtype,
                                        remat=bool(config.student.remat), scan_layers=_scan(config.student),
                                        **overrides)
        return DistillModel(student, student_embed_dim=student_arch.vit.embed_dim,
                            teacher_embed_dim=teacher_arch.embed_dim, teacher_token_dim=teacher_arch.vit.embed_dim,
                            hidden=int(config.loss.projector_hidden), weights=weights, rngs=rngs,
                            norm=projector_norm)

    def build_teacher(rng: jax.Array):
        return registry.create_model(config.teacher.name, rngs=nnx.Rngs(rng), dtype=config.teacher.dtype,
                                     param_dtype=config.teacher.dtype, scan_layers=_scan(config.teacher))

    def init(rng: jax.Array) -> TrainState:
        return _state_from_model(build_model(rng), tx, ema_decay > 0, center_dims, projector_norm == "batch")

    def init_teacher(rng: jax.Array) -> nnx.State:
        return nnx.state(build_teacher(rng), nnx.Param)

    key = jax.random.key(0)
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(key)), nnx.Param, nnx.BatchStat)
    teacher_graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_teacher(key)), nnx.Param)
    abstract_state = jax.eval_shape(init, key)
    abstract_teacher = None if cached else jax.eval_shape(init_teacher, key)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, sharding.FSDP_RULES)
    teacher_shardings = None
    if not cached:
        teacher_shardings = sharding.tree_shardings(abstract_teacher, mesh,
                                                    sharding.rules_for(config.teacher.sharding))
    batch_shardings = {
        "image_5x": sharding.batch_sharding(mesh, 5),
        "tiles_20x": sharding.batch_sharding(mesh, 6),
        "target_tiles": sharding.batch_sharding(mesh, 4),
        "target_tokens": sharding.batch_sharding(mesh, 5),
        "record_index": sharding.batch_sharding(mesh, 1),
    }
    step_batch_shardings = {k: batch_shardings[k] for k in step_keys}
    micro_shardings = {k: sharding.batch_sharding(mesh, len(s.spec) + 1, leading=1)
                       for k, s in step_batch_shardings.items()}

    def loss_fn(params: nnx.State, batch_stats: nnx.State | None, images: jax.Array, targets: losses.Targets):
        """`images [b, V, H, W, 3]`; returns the total loss and (terms, updated BatchNorm statistics)."""
        # BatchNorm statistics are updated in place: rebuilt here so that their Variables belong to this trace.
        model = nnx.merge(graphdef, params, *(() if batch_stats is None else (jax.tree.map(jnp.copy, batch_stats),)))
        terms = losses.xmag_losses(model(registry.normalize(student_arch, images)), targets, weights)
        return terms["total"], (terms, None if batch_stats is None else nnx.state(model, nnx.BatchStat))

    def train_step(state: TrainState, teacher_params: nnx.State, batch: dict[str, jax.Array]):
        micro = {k: jax.lax.with_sharding_constraint(_split_microbatches(v, accum), micro_shardings[k])
                 for k, v in batch.items()}

        first_step = state.step == 0

        def accumulate(carry, mb):
            grad_sum, term_sum, mean_sum, batch_stats = carry
            images = mb["image_5x"]
            grid = images.shape[2] // student_arch.vit.patch_size
            if cached:
                targets = cached_targets(mb)
            else:  # the teacher runs on every view's tiles
                targets = teacher_forward_targets(teacher_arch, teacher_graphdef, weights.token > 0, teacher_params,
                                                  mb["tiles_20x"], grid)
                # The student after the teacher: left free, XLA schedules the student's forward (or the buffers of
                # its saved activations) before the teacher's layer loop and keeps them live through it (+0.8 GiB/chip
                # on v5p-256 with scanned layers, docs/aot.md).
                images, _ = jax.lax.optimization_barrier((images, targets.tiles))
            if state.target_center is not None:
                mean_sum = jax.tree.map(jnp.add, mean_sum, losses.target_means(targets))
                targets = losses.center_targets(targets, state.target_center)
            (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch_stats, images, targets)
            grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
            return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, term_sum, terms), mean_sum,
                    batch_stats), None

        zero_terms = {name: jnp.zeros((), jnp.float32) for name in weights.term_names}
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        zero_means = jax.tree.map(jnp.zeros_like, state.target_center)
        (grad_sum, term_sum, mean_sum, batch_stats), _ = jax.lax.scan(
            accumulate, (zero_grads, zero_terms, zero_means, state.batch_stats), micro)
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        target_center = jax.tree.map(
            lambda c, m: jnp.where(first_step, m / accum, center_momentum * c + (1.0 - center_momentum) * m / accum),
            state.target_center, mean_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = optax.incremental_update(params["student"], ema, step_size=1.0 - ema_decay_at(state.step))
        metrics = {f"loss/{name}": value / accum for name, value in term_sum.items()}
        metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                               target_center=target_center, batch_stats=batch_stats)
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    step = jax.jit(train_step, in_shardings=(state_shardings, teacher_shardings, step_batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)
    return Trainer(
        config=config, mesh=mesh, student_arch=student_arch, teacher_arch=teacher_arch, weights=weights,
        graphdef=graphdef, teacher_graphdef=teacher_graphdef, state_shardings=state_shardings,
        teacher_shardings=teacher_shardings, batch_shardings=batch_shardings,
        _abstract_state=abstract_state, _abstract_teacher=abstract_teacher,
        _init=jax.jit(init, out_shardings=state_shardings),
        _init_teacher=jax.jit(init_teacher, out_shardings=teacher_shardings),
        _step=step, cached=cached, step_batch_keys=step_keys,
    )
