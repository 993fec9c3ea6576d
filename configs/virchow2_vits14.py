"""Virchow2 (ViT-H/14, 632 M params, bf16) at 20x distilled into a ViT-S/14 student at 5x, XMAG-size run.

The teacher embedding is Virchow2's own: concat(CLS, mean of patch tokens) = 2560-d, so the global and
tile projectors map the student to 2560-d. Teacher weights: `python -m xmag_jax.convert import`, then pass
the Orbax directory as `--config.teacher.checkpoint`. On a TPU v5e-64 pod slice, from every host:

    gcloud compute tpus tpu-vm ssh xmag-v5e-64 --zone=us-west4-a --worker=all --command="\
      cd xmag_jax && .venv/bin/python -m xmag_jax.train --distributed \
        --config configs/virchow2_vits14.py --workdir gs://BUCKET/xmag/virchow2_vits14 \
        --config.data.dir=/gcs/BUCKET/xmag_pairs --config.teacher.checkpoint=gs://BUCKET/teachers/virchow2"

A restarted command with the same workdir resumes from the latest checkpoint.

Our variant of XMAG's released recipe (`configs/xmag_uni2h_vitb14.py`): what it changes is listed in
`configs.schema.real_size_config` (ViT-S/14 from scratch, one view, our augmentation, no BatchNorm heads, the
token-level term, batch 1024, lr 1e-3, no EMA), and the teacher is not UNI2-h.
"""

import ml_collections

from xmag_jax import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.real_size_config(teacher="virchow2", teacher_checkpoint="gs://BUCKET/teachers/virchow2")
    c.teacher.sharding = "replicate"
    return c
