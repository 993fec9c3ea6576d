"""Tile readers for `embed_read.isolated_batches` tests: module-level so the spawned reader child imports
them; each wraps `read_batches` and dies on slide `slide_001` the way a real fault would."""

import os
import pathlib
import signal

from data_prep import slide_reader
from xmag_jax import embed_read

VICTIM = "slide_001"
KILLS_ENV = "XMAG_TEST_KILLS_DIR"  # a folder; one file per SIGKILL so far


def _dying_on_victim(sig: signal.Signals, times: int | None):
    real = slide_reader.read_field

    def read_field(slide, *args, **kwargs):
        if slide.slide_id == VICTIM:
            if times is None:
                os.kill(os.getpid(), sig)
            kills = pathlib.Path(os.environ[KILLS_ENV])
            if len(list(kills.iterdir())) < times:
                (kills / str(os.getpid())).touch()
                os.kill(os.getpid(), sig)
        return real(slide, *args, **kwargs)

    slide_reader.read_field = read_field


def segfault_on_victim(*args, **kwargs):
    """What a decoder crash on a corrupt tile does: SIGSEGV while reading the victim's tiles."""
    _dying_on_victim(signal.SIGSEGV, None)
    yield from embed_read.read_batches(*args, **kwargs)


def killed_once_on_victim(*args, **kwargs):
    """What the OOM killer does: SIGKILL from outside, here once while the victim is read."""
    _dying_on_victim(signal.SIGKILL, 1)
    yield from embed_read.read_batches(*args, **kwargs)


def always_killed_on_victim(*args, **kwargs):
    _dying_on_victim(signal.SIGKILL, None)
    yield from embed_read.read_batches(*args, **kwargs)
