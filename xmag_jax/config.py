"""The distillation config schema: every key a config may have, with defaults (big_vision style).

`base_config()` is the single source of the schema: `xmag_jax.distill.config_validation` rejects a config
that has a key not in it or lacks one of its keys, naming the key. The experiment files in `configs/`
(`configs/debug.py`, `configs/xmag_uni2h_vitb14.py`, ...), loaded by path, start from it and override
values, never add keys; one experiment derived from another loads it with `load_sibling`.

Units: batch sizes in tile pairs (one 5x tile + its 16 20x tiles), steps in optimizer updates,
learning rates per update, `peak_tflops_per_device` in dense bf16 TFLOP/s.
"""

import importlib.util
import pathlib
from types import ModuleType

import ml_collections

# Tile pairs in the XMAG training set (arXiv 2509.23097: 3.49 M 5x images from public cohorts).
XMAG_NUM_PAIRS = 3_490_000


def base_config() -> ml_collections.ConfigDict:
    """All keys with the values shared by the real-size configs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 40
    c.batch_size = 8  # global, in tile pairs; must divide by the mesh's data-parallel size (data * fsdp)

    # Frozen 20x teacher: a registry name plus an Orbax checkpoint from `xmag_jax.convert import`.
    # An empty checkpoint means random init, accepted only with allow_random_teacher (debug/tests).
    c.teacher = ml_collections.ConfigDict()
    c.teacher.name = "vit_test_teacher"
    c.teacher.checkpoint = ""
    c.teacher.allow_random_teacher = False
    c.teacher.dtype = "bfloat16"
    c.teacher.sharding = "replicate"  # or "fsdp" when the teacher does not fit replicated
    # Run the blocks under a scan with stacked parameters (compiles one block instead of `depth`); the
    # checkpoints on disk keep the per-block layout either way. On in the real-size configs.
    c.teacher.scan_layers = False

    # 5x student: a random init (seed), or the weights of `init`.
    c.student = ml_collections.ConfigDict()
    c.student.name = "vit_s14"  # ViT-S/14, 224 px -> 16x16 tokens
    c.student.dtype = "bfloat16"  # compute dtype; parameters stay float32
    c.student.remat = False
    c.student.scan_layers = False  # as teacher.scan_layers
    # Initial LayerScale gamma; None keeps the registry's (1e-5, DINOv2's choice for long runs). Only the
    # initial value changes: the trained student has the registry architecture and exports unchanged.
    c.student.layer_scale_init = ml_collections.config_dict.placeholder(float)
    # A model checkpoint directory (`xmag_jax.convert import`, or a run's `xmag_jax.distill.export`) of the
    # student's architecture whose parameters the student starts from at step 0 (also the EMA's start); the
    # projectors and the optimizer state start fresh. A resumed run continues from its own checkpoints and
    # never re-applies it. Empty: random init. Not combinable with layer_scale_init (the init's gammas win).
    c.student.init = ""

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""
    c.data.split = "train"
    c.data.worker_count = 8  # Grain multiprocess workers per host; 0 = in-process
    c.data.prefetch_buffer = 2
    c.data.max_bad_record_fraction = 0.01
    # Augmented views of each pair (XMAG: 2): independent draws, each shared by the 5x tile and its 20x field.
    # The teacher runs on every view and each view's loss is against the teacher on the same view; the V losses
    # are averaged. batch_size stays in pairs; a step costs about V times the compute of one view.
    c.data.views = 1
    # Teacher targets from a cache written by `python -m xmag_jax.teacher_cache` instead of running the
    # teacher in every step ("" = live teacher). The cache holds the teacher's targets of each pair under
    # each geometric state of the augmentation (flips/D4), computed on the un-jittered field: unlike live
    # distillation, colour and HED jitter then reach the student's 5x tile only (as with
    # data.augment.student_only). A cache that does not match this config (teacher, weights, dtype,
    # dataset, states, tokens) is refused before compiling; teacher.sharding is then unused.
    c.data.teacher_cache = ""
    c.data.augment = ml_collections.ConfigDict()
    # "d4_color_hed" (D4 + colour + HED jitter) or "xmag" (XMAG's released recipe: h/v flips, colour jitter
    # with p = 0.5); see xmag_jax/data/augment.py. The keys below override the preset; None keeps its choice.
    c.data.augment.preset = "d4_color_hed"
    c.data.augment.d4 = ml_collections.config_dict.placeholder(bool)
    c.data.augment.color = ml_collections.config_dict.placeholder(bool)
    c.data.augment.hed = ml_collections.config_dict.placeholder(bool)
    c.data.augment.student_only = False

    # XMAG dual-level loss: global representation + local spatial token mapping (tile and token level).
    c.loss = ml_collections.ConfigDict()
    c.loss.global_weight = 1.0
    c.loss.global_smooth_l1_weight = 0.0
    c.loss.tile_weight = 1.0
    c.loss.token_weight = 1.0
    c.loss.projector_hidden = 2048
    # Projector heads (xmag_jax/distill/projectors.py): "none" = Linear -> GELU -> Linear; "batch" = XMAG's
    # Linear -> BatchNorm -> GELU -> Linear, statistics over the global batch (per view, per micro-batch under
    # optim.grad_accum), running statistics in the train state.
    c.loss.projector_norm = "none"
    c.loss.mode = "dual"  # one of xmag_jax.distill.losses.MODES: "dual" | "global_only" | "local_only"
    # Subtract a running mean of the teacher's embeddings / tokens from the targets (DINO-style centering):
    # center <- m * center + (1 - m) * batch mean, set to the first batch's mean by step 0 (which the warmup
    # gives learning rate 0, so no update ever sees the zero initial center).
    c.loss.center_targets = False  # the paper's loss; configs/debug.py turns it on (see there)
    c.loss.center_momentum = 0.9

    # AdamW with linear warmup then cosine decay to lr * min_lr_ratio.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr_ratio = 0.01
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1
    c.optim.ema_decay = 0.0  # 0 disables the EMA student
    c.optim.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step)): the init is soon forgotten

    # Mesh axes; -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.log_every = 50  # steps between progress lines / TensorBoard points; JSONL gets every step
    c.log_record_index = False  # write each step's record indices (process 0's) into the JSONL
    # MFU's peak (dense bf16 TFLOP/s per device): None takes it from the device kind (`xmag_jax.chips`: TPU
    # v4/v5e/v5p/v6e, A100/H100/H200); CPUs have none and report no MFU. Set it only to override the table.
    c.peak_tflops_per_device = ml_collections.config_dict.placeholder(float)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000  # steps; the last step is always saved
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c


def real_size_config(*, teacher: str, teacher_checkpoint: str, epochs: int = 10) -> ml_collections.ConfigDict:
    """A real-size run: `teacher` (registry name, bf16, converted Orbax checkpoint) into a ViT-S/14 student.

    Global batch 1024 pairs; `epochs` passes over the 3.49 M XMAG pairs. This is our variant of XMAG's released
    recipe (`configs/xmag_uni2h_vitb14.py`), which starts from it and sets the recipe's values. What the variant
    changes: a ViT-S/14 student from a random init (recipe: ViT-B/14 from DINOv2 weights, `student.init`);
    batch 1024 (1152), lr 1e-3 (5e-4), warmup 5 % (1 epoch), no EMA (0.999); one augmented view (`data.views`
    2) with our D4 + colour + HED augmentation (XMAG's flips + colour jitter); projector heads without
    BatchNorm, hidden 2048 (`loss.projector_norm` "batch", 1536); tile weight 1.0 (0.5) and the token-level
    term on at weight 1.0 (off: XMAG does not use the teacher's patch tokens).
    """
    c = base_config()
    c.teacher.name = teacher
    c.teacher.checkpoint = teacher_checkpoint
    c.batch_size = 1024
    c.total_steps = epochs * XMAG_NUM_PAIRS // c.batch_size
    c.optim.warmup_steps = c.total_steps // 20
    c.teacher.scan_layers = c.student.scan_layers = True  # compile time: see docs/aot.md
    # array_record reads local files: on a pod, the bucket mounted on every worker with Cloud Storage FUSE
    # (`launch/tpu_pod.sh --gcsfuse BUCKET`); GCS in open-source array_record: google/array_record#120.
    c.data.dir = "/gcs/YOUR_BUCKET/xmag_pairs"
    c.checkpoint.every = 1000
    return c


def load_sibling(config_file: str, name: str) -> ModuleType:
    """The experiment file `name`.py beside `config_file` (pass `__file__`), loaded by path: experiment files
    are not a package, so `configs/demo.py` derives from `configs/debug.py` wherever it is run from."""
    path = pathlib.Path(config_file).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_xmag_config_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: no such experiment config")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
