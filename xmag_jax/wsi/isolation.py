"""Slides read in a spawned child process, so that a crash in a decoder fails one slide, not the job.

Used by `xmag_jax.embed.reader.isolated_batches` (one child streams a job's tile batches) and by
`data_prep.tile_pairs` (`SlideProcess`: one child per Beam worker runs the per-slide work). Both read a
child's death the same way (`Death`):
- a fault signal (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL: what a decoder does on a corrupt tile) fails the
  slide the child was reading (`crash_failure`, error kind `failures.READER_CRASH`), and a new child goes on;
- anything else (SIGKILL from the kernel's out-of-memory killer or a person, SIGTERM, an exit) is not the
  slide's fault: a new child reads the unfinished work again, nothing blamed. After `MAX_KILLS` such deaths
  in a row without a slide finished (`KillCount`), the job stops with `ReaderKilledError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from xmag_jax import errors
from xmag_jax.wsi import failures, inputs

CONTEXT = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or slide handles
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL})
MAX_KILLS = 3  # deaths in a row from outside the child, without a slide finished, before the job stops


class ReaderKilledError(errors.UserError):
    """The slide reader child keeps being killed from outside (most likely out of memory)."""


@dataclasses.dataclass(frozen=True)
class Death:
    """How a child ended: `exitcode` as `multiprocessing.Process.exitcode` (-N: killed by signal N)."""

    exitcode: int | None

    @property
    def fault(self) -> signal.Signals | None:
        """The fault signal it died of (the slide in hand is to blame), or None (killed from outside, or an exit)."""
        code = self.exitcode
        return signal.Signals(-code) if code is not None and code < 0 and -code in FAULT_SIGNALS else None

    def __str__(self) -> str:
        code = self.exitcode
        return signal.Signals(-code).name if code is not None and code < 0 else f"exit status {code}"


def crash_failure(spec: inputs.SlideSpec, death: Death) -> failures.Failure:
    """The `READER_CRASH` failure of the slide a child died on of a fault signal."""
    return failures.Failure.kind(spec, failures.READER_CRASH, f"{spec.path}: the process reading this slide died "
                                 f"of {death} (a crash in a decoder on a corrupt tile?)")


class KillCount:
    """Deaths from outside in a row without a slide finished; `killed` raises ReaderKilledError at `max_kills`.
    `advice`: what the user can change (flags), ending the error message."""

    def __init__(self, advice: str, max_kills: int = MAX_KILLS):
        self.advice, self.max_kills, self.kills = advice, max_kills, 0

    def progressed(self) -> None:
        """A slide finished (or failed on its own): the count starts over."""
        self.kills = 0

    def killed(self, death: Death, again: str) -> None:
        """Counts a death that is no slide's fault; warns that `again` (e.g. "the 2 unfinished slide(s)") is
        read again, or raises ReaderKilledError at the limit."""
        self.kills += 1
        if self.kills >= self.max_kills:
            raise ReaderKilledError(
                f"the slide reader process was killed {self.kills} times in a row ({death}) without finishing a "
                f"slide, from outside the process: most likely the kernel's out-of-memory killer; {self.advice}")
        warnings.warn(f"the slide reader process died ({death}), not of a decoder fault: reading {again} again, "
                      "none blamed", stacklevel=3)


@dataclasses.dataclass(frozen=True)
class ChildError:
    """A bug in the child (an exception, not a death): its traceback, raised again in the parent."""

    traceback: str

    @classmethod
    def current(cls) -> ChildError:
        return cls(traceback.format_exc())

    def reraise(self):
        raise RuntimeError(f"the slide reader process failed:\n{self.traceback}")


class SlideProcess:
    """One long-lived spawned child (it imports once) that runs `fn(spec, *args)` for one slide at a time.

    `fn` must be a module-level function (the child imports it by name: a function of a module run as
    `python -m pkg.mod` is found as `pkg.mod`'s) and its result picklable."""

    def __init__(self, advice: str, max_kills: int = MAX_KILLS):
        self._kills = KillCount(advice, max_kills)
        self._child: multiprocessing.Process | None = None
        self._conn = None

    def run(self, fn: Callable[..., Any], spec: inputs.SlideSpec, *args) -> Any:
        """`fn(spec, *args)` run in the child; a `READER_CRASH` `Failure` if the child died of a fault signal
        on it; run again in a new child if it was killed from outside (ReaderKilledError past the limit)."""
        while True:
            if self._child is None:
                self._conn, theirs = CONTEXT.Pipe()
                self._child = CONTEXT.Process(target=_serve, args=(theirs,), name="slide-reader", daemon=True)
                self._child.start()
                theirs.close()
            try:
                self._conn.send((_name_of(fn), spec, args))
                reply = self._conn.recv()
            except (EOFError, OSError):  # the child died
                death = self._reap()
                if death.fault is not None:
                    self._kills.progressed()
                    return crash_failure(spec, death)
                self._kills.killed(death, f"slide {spec.slide_id}")
                continue
            if isinstance(reply, ChildError):
                reply.reraise()
            self._kills.progressed()
            return reply

    def _reap(self) -> Death:
        self._conn.close()
        self._child.join()
        death = Death(self._child.exitcode)
        self._child = self._conn = None
        return death

    def close(self) -> None:
        """Ends the child (it exits when its pipe closes)."""
        if self._child is not None:
            self._conn.close()
            self._child.join(timeout=10)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._child = self._conn = None


def _name_of(fn: Callable) -> tuple[str, str]:
    """(module, name) of a module-level function, naming `__main__` by the module `python -m` ran as (a
    function pickled by value, as Beam does with a `__main__` module's, is not the one pickle finds there)."""
    module = fn.__module__
    if module == "__main__" and getattr(sys.modules["__main__"], "__spec__", None) is not None:
        module = sys.modules["__main__"].__spec__.name
    return module, fn.__qualname__


def _serve(conn) -> None:
    """The child of `SlideProcess`: `((module, name), spec, args)` in, `module.name(spec, *args)` (or a
    `ChildError`) out, until EOF."""
    while True:
        try:
            (module, name), spec, args = conn.recv()
        except EOFError:
            return
        try:
            reply = getattr(importlib.import_module(module), name)(spec, *args)
        except Exception:  # noqa: BLE001 - a bug in fn is raised again in the parent
            reply = ChildError.current()
        conn.send(reply)
