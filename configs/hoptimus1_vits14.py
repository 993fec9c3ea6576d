"""H-optimus-1 (ViT-g/14, 1.13 B params, bf16) at 20x distilled into a ViT-S/14 student at 5x, XMAG-size run.

The teacher is FSDP-sharded (2.3 GB of bf16 weights per replica otherwise) over an `fsdp` axis of 4.
Teacher weights: `python -m xmag_jax.convert import`, then pass the Orbax directory as
`--config.teacher.checkpoint`. On a TPU v5p-128 pod slice (64 chips, 16 hosts), from every host:

    gcloud compute tpus tpu-vm ssh xmag-v5p-128 --zone=us-east5-a --worker=all --command="\
      cd xmag_jax && .venv/bin/python -m xmag_jax.train --distributed \
        --config configs/hoptimus1_vits14.py --workdir gs://BUCKET/xmag/hoptimus1_vits14 \
        --config.data.dir=/gcs/BUCKET/xmag_pairs --config.teacher.checkpoint=gs://BUCKET/teachers/h_optimus_1"

A restarted command with the same workdir resumes from the latest checkpoint.

Our variant of XMAG's released recipe (`configs/xmag_uni2h_vitb14.py`): what it changes is listed in
`configs.schema.real_size_config` (ViT-S/14 from scratch, one view, our augmentation, no BatchNorm heads, the
token-level term, batch 1024, lr 1e-3, no EMA), and the teacher is not UNI2-h.
"""

import ml_collections

from xmag_jax import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = schema.real_size_config(teacher="h_optimus_1", teacher_checkpoint="gs://BUCKET/teachers/h_optimus_1")
    c.teacher.sharding = "fsdp"
    c.mesh.fsdp = 4
    return c
