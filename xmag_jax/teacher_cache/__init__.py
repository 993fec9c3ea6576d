"""Teacher-target cache: run the frozen teacher once per pair and geometric state, train from the stored targets.

    python -m xmag_jax.teacher_cache --config configs/NAME.py --out CACHE [--dtype bfloat16] [--config.KEY=VALUE]
    python -m xmag_jax.train --config configs/NAME.py --workdir DIR --config.data.teacher_cache=CACHE

`records` is the on-disk format, `writer` (the command line in `__main__`) writes it, `reader` reads it by
(pair index, state) for the input pipeline and `eval fidelity`, `spec` checks that a cache serves a config.
"""
