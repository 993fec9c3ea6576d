"""On-disk formats, one module each (writer, reader, schema, version).

`pair_records`: 5x/20x tile pairs (ArrayRecord + TFDS metadata); `bag_records`: every 5x tissue tile of a slide
(ArrayRecord + `slides.csv`); `feature_h5`: one slide's tile embeddings (TRIDENT-layout h5). The model and run
checkpoints are `xmag_jax.models.checkpoint` and `xmag_jax.distill.checkpointing`; the teacher-target cache is
`xmag_jax.teacher_cache.records`.
"""
