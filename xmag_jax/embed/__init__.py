"""Slide embeddings (`python -m xmag_jax.embed`): tissue tiles at a target µm/px through a ViT, one
TRIDENT-layout h5 per slide (`xmag_jax.formats.feature_h5`).

`plan` (no JAX): a slide's tiling plan, shared with `data_prep.tile_bags`. `reader` (no JAX): threaded tile
reads into fixed-shape batches, and the same in a child process (`xmag_jax.wsi.isolation`). `run`: the
embedding loop, provenance fingerprints, resume and the failure manifest. `__main__`: the command line.
"""
