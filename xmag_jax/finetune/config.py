"""The finetune config schema: every key, with defaults (big_vision style; `configs/mil_e2e*.py` override values).

Units: `slides_per_step` slides per optimizer update; `tiles_per_slide` 5x tiles sampled per slide per step;
learning rates per update; `epochs` passes over a fold's training slides; memory in GiB.
"""

from __future__ import annotations

import ml_collections

from xmag_jax.data import augment
from xmag_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.bags = ""  # folder from `python -m data_prep.tile_bags`
    c.data.labels = ""  # CSV slide_id,label[,fold]
    c.data.folds = 5  # k of the slide-level k-fold CV when the CSV has no `fold` column (stratified, seeded)
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.preset = "xmag"  # per-tile flips + colour jitter, as the distillation's XMAG recipe

    c.model = ml_collections.ConfigDict()
    c.model.init = ""  # model checkpoint dir (`models.checkpoint.save_model`, e.g. a distilled student)
    c.model.dtype = "bfloat16"  # compute dtype of the student; parameters stay float32
    c.model.remat = True  # rematerialise each block in the backward pass
    c.model.freeze_blocks = 0  # freeze the patch embedding and the first N blocks; -1: the whole student

    c.head = ml_collections.ConfigDict()  # GatedABMIL (xmag_jax.eval.mil), CLAM sizes
    c.head.hidden = 512
    c.head.attn_dim = 256
    c.head.dropout = 0.25
    # z-score the head's input per dimension with the initial student's feature mean/std over the fold's
    # training tiles, fixed, in both arms; False: raw features as CLAM (a random or weak student's features vary
    # ~1% across tiles around a large common vector, which a head at these learning rates cannot resolve)
    c.head.standardize = True

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20
    c.train.slides_per_step = 4
    c.train.tiles_per_slide = 512  # sampled without replacement; a slide with fewer uses all (masked)
    c.train.grad_accum = 1  # micro-steps of slides_per_step / grad_accum slides, gradients averaged

    c.optim = ml_collections.ConfigDict()
    c.optim.head_lr = 2e-4
    c.optim.backbone_lr = 2e-5  # of the last block; block i gets backbone_lr * layer_decay ** (depth - i)
    c.optim.layer_decay = 0.75
    c.optim.weight_decay = 0.05  # AdamW, on matrices only (not biases, norms, LayerScale)
    c.optim.warmup_fraction = 0.1  # of a fold's steps, linear warmup before the cosine decay
    c.optim.clip_norm = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.chunk_tiles = 256  # tiles per forward when embedding whole slides

    c.frozen = ml_collections.ConfigDict()  # the baseline: the same head on the initial student's features
    c.frozen.enabled = True
    c.frozen.epochs = 20
    c.frozen.lr = 2e-4

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.memory_gib = 0.0  # per-device memory for the tiles_per_slide check; 0: the device's (host RAM on CPU)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.log_every = 10
    c.heatmap_slides = 4  # attention heatmaps of this many held-out slides per fold
    return c


def flatten(c, prefix: str = "") -> dict:
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (one line naming the key) for a config no run can use; before anything is read."""
    schema, given = flatten(base_config()), flatten(config)
    unknown, missing = sorted(set(given) - set(schema)), sorted(set(schema) - set(given))
    if unknown or missing:
        raise ConfigError(
            f"config: unknown keys {unknown}, missing keys {missing} (schema: xmag_jax/finetune/config.py)")
    for key in ("data.bags", "data.labels", "model.init"):
        if not given[key]:
            raise ConfigError(f"config.{key}: required (pass --config.{key}=PATH)")
    positive = ("train.epochs", "train.slides_per_step", "train.tiles_per_slide", "train.grad_accum",
                "eval.chunk_tiles", "head.hidden", "head.attn_dim", "checkpoint.every", "checkpoint.keep",
                "log_every", "frozen.epochs")
    for key in positive:
        if int(given[key]) < 1:
            raise ConfigError(f"config.{key}={given[key]}: expected an integer >= 1")
    if config.data.folds < 2:
        raise ConfigError(f"config.data.folds={config.data.folds}: expected >= 2 folds")
    if config.train.slides_per_step % config.train.grad_accum:
        raise ConfigError(f"config.train.slides_per_step={config.train.slides_per_step} is not divisible by "
                          f"config.train.grad_accum={config.train.grad_accum}")
    for key in ("optim.head_lr", "optim.backbone_lr", "frozen.lr"):
        if not given[key] >= 0:
            raise ConfigError(f"config.{key}={given[key]}: expected a learning rate >= 0")
    if not 0 < config.optim.layer_decay <= 1:
        raise ConfigError(f"config.optim.layer_decay={config.optim.layer_decay}: expected a factor in (0, 1]")
    if not 0 <= config.optim.warmup_fraction < 1:
        raise ConfigError(f"config.optim.warmup_fraction={config.optim.warmup_fraction}: expected [0, 1)")
    if not 0 <= config.head.dropout < 1:
        raise ConfigError(f"config.head.dropout={config.head.dropout}: expected [0, 1)")
    if config.model.freeze_blocks < -1:
        raise ConfigError(f"config.model.freeze_blocks={config.model.freeze_blocks}: expected -1 (all) or >= 0")
    augment.AugmentOptions.from_config(config.data.augment.to_dict())
