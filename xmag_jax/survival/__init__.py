"""CellEcoNet-style spatial survival model on slide features.

Our design after arXiv 2508.16742, whose code is not public.

Words (tile patch tokens pooled to S x S, or tile embeddings) -> phrases (a transformer over a tile and its 8 grid
neighbours) -> a sentence (a transformer over the slide's phrases with 2-D positions in µm) -> attention pooling ->
recurrence risk, trained with the Cox partial likelihood and cross-validated against ABMIL, a position-free
transformer and a clinical Cox model: `python -m xmag_jax.survival --config configs/celleconet.py --workdir DIR`.
"""
