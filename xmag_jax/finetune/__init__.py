"""End-to-end training at 5x: the student and a gated-attention MIL head fine-tuned together on slide labels.

`python -m xmag_jax.finetune --config configs/mil_e2e.py --workdir DIR`; see `xmag_jax/finetune/run.py`.
"""
