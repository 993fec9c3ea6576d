"""Ahead-of-time compile of the distillation step for Cloud TPU topologies, on a host without a TPU.

Modules, each depending only on those before it: `compile` (compile one step, its `Report`), `search`
(the largest batch that fits), `docs` (the page docs/aot.md), `cli` (`python -m xmag_jax.aot`).
"""
