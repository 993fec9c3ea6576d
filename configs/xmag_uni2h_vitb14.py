"""XMAG's released recipe (arXiv 2509.23097; code AI4Path-Lab/XMAG): UNI2-h at 20x into DINOv2 ViT-B/14 at 5x.

Every value below names the file of the released code it comes from (`/work/shared/reference/xmag_recipe.md`
summarises them). Two inputs are converted once:

    # the teacher: UNI2-h's hub checkpoint
    python -m xmag_jax.convert import --model uni2_h --weights uni2_h/pytorch_model.bin --out teachers/uni2_h
    # the student's start: DINOv2 ViT-B/14 (LVD-142M), e.g. timm's vit_base_patch14_dinov2.lvd142m
    python -m xmag_jax.convert import --model vit_b14 --weights dinov2_vitb14/model.safetensors \
        --out students/dinov2_vitb14

then, on a TPU v5e-64 pod slice (64 chips, 16 hosts; 1152 pairs = 18 per chip, x 2 views), from every host:

    gcloud compute tpus tpu-vm ssh xmag-v5e-64 --zone=us-west4-a --worker=all --command="\
      cd xmag_jax && .venv/bin/python -m xmag_jax.train --distributed \
        --config configs/xmag_uni2h_vitb14.py --workdir gs://BUCKET/xmag/xmag_uni2h_vitb14 \
        --config.data.dir=/gcs/BUCKET/xmag_pairs --config.teacher.checkpoint=gs://BUCKET/teachers/uni2_h \
        --config.student.init=gs://BUCKET/students/dinov2_vitb14"

Check the HBM fit first: `python -m xmag_jax.aot --config configs/xmag_uni2h_vitb14.py --topology v5e-64`.
The exported model (`python -m xmag_jax.distill.export --workdir RUN --out student`) is the EMA student.

Warmup: the released `configs/pretrain_mg.yaml` sets warmup_epochs = max_epochs = 10, so its learning rate
ramps up over the whole run, which reads as unintended (the paper describes a warmup, then a decay). This
config warms up over 1 epoch (3029 steps, 10 % of the run): the released code counts warmup in whole epochs,
and one is the shortest it can express. `configs/xmag_uni2h_vitb14.py:literal_warmup` reproduces the released
value (a linear ramp to the peak over the whole run, warmup_steps = total_steps - 1).

Where our code differs from the released one: compute in bfloat16 on TPU (released: fp16 mixed precision on A100
GPUs); cosine distance 1 - cos with eps 1e-12 (released: -cos, eps 1e-8; the same gradients); the decay after the
warmup is our cosine to lr x optim.min_lr_ratio (the reference does not state the released decay's end).
"""

import ml_collections

from xmag_jax import config as schema

# Pairs per global batch: 48 per GPU x 24 GPUs (configs/pretrain_mg.yaml, train_multigpu.sh).
XMAG_BATCH = 1152
XMAG_EPOCHS = 10  # configs/pretrain_mg.yaml max_epochs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: None for this recipe, "literal_warmup" for the released code's whole-run warmup."""
    if arg not in (None, "", "literal_warmup"):
        raise ValueError(f"configs/xmag_uni2h_vitb14.py: unknown argument {arg!r}; expected literal_warmup or none")
    c = schema.real_size_config(teacher="uni2_h", teacher_checkpoint="gs://BUCKET/teachers/uni2_h",
                                epochs=XMAG_EPOCHS)
    # Teacher: UNI2-h, frozen, CLS of each 224 px sub-tile of the 896 px 20x field (models/teacher.py).
    c.teacher.dtype = "bfloat16"
    c.teacher.sharding = "replicate"  # 1.4 GB in bf16 fits every chip
    # Student: DINOv2 ViT-B/14 at 224 px from the official LVD-142M weights (models/student.py).
    c.student.name = "vit_b14"
    c.student.dtype = "bfloat16"
    c.student.init = "gs://BUCKET/students/dinov2_vitb14"
    c.student.layer_scale_init = None  # the DINOv2 weights' own LayerScale gammas

    # Two augmented views per pair, each against the teacher on the same view (data/dataset.py num_augmentations).
    c.data.views = 2
    # XMAG's augmentation (data/transform.py): h/v flips p = 0.5 each, colour jitter with p = 0.5, no HED.
    c.data.augment.preset = "xmag"

    # Loss (configs/pretrain_mg.yaml, models/distiller.py, models/heads.py): cosine, 1.0 global + 0.5 local
    # (the 16 sub-tile CLS), teacher patch tokens unused; heads Linear(768, 1536) -> BatchNorm -> GELU ->
    # Linear(1536, 1536) with synchronised BatchNorm.
    c.loss.mode = "dual"
    c.loss.global_weight = 1.0
    c.loss.global_smooth_l1_weight = 0.0
    c.loss.tile_weight = 0.5
    c.loss.token_weight = 0.0
    c.loss.projector_hidden = 1536
    c.loss.projector_norm = "batch"
    c.loss.center_targets = False

    # Optimiser (configs/pretrain_mg.yaml): AdamW lr 5e-4, weight decay 0.05, gradient-norm clip 1.0.
    c.batch_size = XMAG_BATCH
    c.total_steps = XMAG_EPOCHS * schema.XMAG_NUM_PAIRS // XMAG_BATCH  # 30295
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = schema.XMAG_NUM_PAIRS // XMAG_BATCH  # 1 epoch, see the module docstring
    if arg == "literal_warmup":
        c.optim.warmup_steps = c.total_steps - 1
    # EMA of the student, decay 0.999 from its (pretrained) init, the released model (models/distiller.py).
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = False

    return c
