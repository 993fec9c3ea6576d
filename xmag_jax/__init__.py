"""xmag_jax: cross-magnification distillation of 20x pathology foundation models into a 5x ViT."""

__version__ = "0.1.0"
