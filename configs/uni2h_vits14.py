"""UNI2-h (ViT-H/14, 681 M params, bf16) at 20x distilled into a ViT-S/14 student at 5x, XMAG-size run.

Teacher weights: convert the hub checkpoint once with `python -m xmag_jax.convert import` and pass the
Orbax directory as `--config.teacher.checkpoint`. Global batch 1024 pairs, 10 epochs of the 3.49 M pairs.
On a TPU v5e-64 pod slice (64 chips, 16 hosts), from every host:

    gcloud compute tpus tpu-vm ssh xmag-v5e-64 --zone=us-west4-a --worker=all --command="\
      cd xmag_jax && .venv/bin/python -m xmag_jax.train --distributed \
        --config configs/uni2h_vits14.py --workdir gs://BUCKET/xmag/uni2h_vits14 \
        --config.data.dir=/gcs/BUCKET/xmag_pairs --config.teacher.checkpoint=gs://BUCKET/teachers/uni2_h"

A restarted command with the same workdir resumes from the latest checkpoint.

Our variant of XMAG's released recipe (`configs/xmag_uni2h_vitb14.py`): what it changes is listed in
`configs.schema.real_size_config` (ViT-S/14 from scratch, one view, our augmentation, no BatchNorm heads, the
token-level term, batch 1024, lr 1e-3, no EMA).
"""

import ml_collections

from xmag_jax import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.real_size_config(teacher="uni2_h", teacher_checkpoint="gs://BUCKET/teachers/uni2_h")
    c.teacher.sharding = "replicate"  # 1.4 GB in bf16 fits every chip
    return c
