"""Tile readers for `xmag_jax.embed.reader.isolated_batches` tests: module-level so the spawned reader child imports
them; each wraps `read_batches` and dies on slide `slide_001` the way a real fault would."""

import ctypes
import os
import pathlib
import signal

from xmag_jax.embed import reader
from xmag_jax.wsi import slide_reader

VICTIM = "slide_001"
KILLS_ENV = "XMAG_TEST_KILLS_DIR"  # a folder; one file per SIGKILL so far


def _on_victim(die, times: int | None = None):
    """Patches the child's `read_field` to call `die()` on the victim's tiles (the first `times` times of the
    job, counted in the KILLS_ENV folder; every time if None)."""
    real = slide_reader.read_field

    def read_field(slide, *args, **kwargs):
        if slide.slide_id == VICTIM:
            if times is None:
                die()
            kills = pathlib.Path(os.environ[KILLS_ENV])
            if len(list(kills.iterdir())) < times:
                (kills / str(os.getpid())).touch()
                die()
        return real(slide, *args, **kwargs)

    slide_reader.read_field = read_field


def _segfault():
    ctypes.string_at(0)  # a NULL read in C, as a decoder on a corrupt tile does: SIGSEGV in this thread


def _killed_from_outside():
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer sends


def segfault_on_victim(*args, **kwargs):
    _on_victim(_segfault)
    yield from reader.read_batches(*args, **kwargs)


def killed_once_on_victim(*args, **kwargs):
    _on_victim(_killed_from_outside, times=1)
    yield from reader.read_batches(*args, **kwargs)


def always_killed_on_victim(*args, **kwargs):
    _on_victim(_killed_from_outside)
    yield from reader.read_batches(*args, **kwargs)
