"""The largest global batch whose train step fits a TPU chip's HBM, by compiling (`compile.compile_step`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from xmag_jax import topologies
from xmag_jax.aot import compile as compile_lib
from xmag_jax.aot.compile import DEFAULT_MFU, Report
from xmag_jax.topologies import Topology


def find_batch(config: ml_collections.ConfigDict, topo: Topology, *, mfu: float = DEFAULT_MFU, config_name: str = "",
               max_batch: int | None = None, max_tries: int = 10, initial: Report | None = None,
               log: Callable[[str], None] = print) -> tuple[Report | None, list[Report]]:
    """Largest global batch (a multiple of `batch_unit`) whose step fits HBM, by compiling.

    Starts at the config's batch, then brackets and narrows the largest fit: each next try is where the
    per-chip HBM of the tries so far, taken as linear in the batch (fixed state + per-pair activations),
    reaches the chip's HBM, kept strictly inside the bracket (doubling/halving at most x16 while one
    side is open; bisection when the line points at a batch already tried). Ends when the largest fit
    and the smallest misfit are one unit apart. `initial`: a report of this config and topology already
    compiled (counts as the first try). Returns (best fitting report or None, every try).
    """
    devices = topologies.compile_devices(topo)
    unit = compile_lib.batch_unit(config, devices)
    max_batch = max_batch or unit * 4096
    tries: dict[int, Report] = {}
    lo, hi = 0, None  # largest fitting batch, smallest misfit

    batch = min(max_batch, max(unit, int(config.batch_size) // unit * unit))
    while len(tries) < max_tries:
        if initial is not None and not tries:
            report = initial
            batch = report.global_batch
        else:
            report = compile_lib.compile_step(config, topo, global_batch=batch, mfu=mfu, config_name=config_name,
                                              devices=devices)
        tries[batch] = report
        log(f"  try global batch {batch:6d} ({batch / topo.num_chips:g} per chip): {compile_lib.fit_text(report)}  "
            f"[{report.compile_seconds:.0f} s compile]")
        if report.fits:
            lo = max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)
        low, high = lo + unit, (hi - unit if hi is not None else max_batch)
        if low > high:
            break
        guess = batch_at_hbm(tries, lo, hi, report.hbm_bytes)
        guess = min(guess, 16 * lo) if hi is None else guess
        guess = max(guess, hi // 16) if not lo and hi is not None else guess
        batch = min(high, max(low, int(guess) // unit * unit))
        if batch in tries:
            batch = max(low, (low + high) // 2 // unit * unit)
    ordered = [tries[b] for b in sorted(tries)]
    return (tries[lo] if lo else None), ordered


def batch_at_hbm(tries: dict[int, Report], lo: int, hi: int | None, hbm: int) -> float:
    """Batch where the per-chip total of the tries, linear in the batch, reaches `hbm`."""
    if lo and hi is not None:
        (b1, r1), (b2, r2) = (lo, tries[lo]), (hi, tries[hi])
    elif len(tries) >= 2:
        (b1, r1), (b2, r2) = sorted(tries.items())[-2:] if hi is None else sorted(tries.items())[:2]
    else:  # one try: its state (arguments other than the batch) is fixed, the rest grows with the batch
        (b2, r2), = tries.items()
        fixed = sum(v for k, v in r2.argument_groups.items() if not k.startswith("batch"))
        b1, r1 = 0, dataclasses.replace(r2, total_bytes=fixed)
    slope = (r2.total_bytes - r1.total_bytes) / (b2 - b1)
    if slope <= 0:
        return 2 * b2 if r2.fits else b2 / 2
    return b2 + (hbm - r2.total_bytes) / slope
