"""Run per-slide work in a child process, so a crash inside a codec (a segfault on a corrupt slide) fails
that slide only. Without it, a dead Beam DirectRunner worker makes the whole pipeline hang.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from data_prep import pairs
from xmag_jax import atomic
from xmag_jax.wsi import inputs


class SlideProcess:
    """One long-lived child process (spawned, imports once) that runs `fn(spec, *args)` per slide."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def run(self, fn: Callable[..., dict], spec: inputs.SlideSpec, work_dir: str, *args) -> dict:
        """fn's result, or a `WorkerCrash` failure record (also written as the slide's failed marker)."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(fn, spec, *args).result()
        except BrokenProcessPool as err:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            failure = {"slide": spec.path, "slide_id": spec.slide_id, "status": "failed", "error_type": "WorkerCrash",
                       "message": f"the process reading this slide died (a crash in a decoder?): {err}"}
            atomic.write_json(pairs.failed_path(work_dir, spec.slide_id), failure)
            return failure

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
