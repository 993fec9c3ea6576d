"""The failed-slide record of every slide pipeline (`xmag_jax.embed`, `data_prep.tile_pairs`, `tile_bags`).

A job that reads many slides goes on past a bad one and lists it in `OUT/failures.jsonl`, one JSON object a
line: `slide` (its path), `slide_id`, `status` ("failed"), `error_type`, `message`, `time` (UTC, ISO 8601,
seconds) and, for an unexpected error (not a `UserError` such as a `SlideError`), its `traceback`. The file
lists the failures of the job's latest run and is rewritten whole (temp file + rename), so a reader never
sees a half-written line.

`error_type` is the exception's class name (e.g. `NotASlideError`, `RegionReadError`, `ResolutionError`),
or one of the kinds named here for failures that are no exception in this process.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import traceback
from collections.abc import Iterable

from xmag_jax import atomic, errors
from xmag_jax.wsi import inputs

FAILURES_FILE = "failures.jsonl"
READER_CRASH = "ReaderCrash"  # the child process reading the slide died of a fault signal (`isolation`)
NO_RESULT = "NoResult"  # the pipeline ended without a result for the slide (its worker died unisolated)
INCOMPLETE_READ = "IncompleteRead"  # the reader stopped before passing on all of the slide's tiles
TRACEBACK_CHARS = 2000  # the end of a traceback kept in a record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A slide that could not be processed; `record()` is its line in `failures.jsonl`."""

    slide: str  # the slide's path as listed
    slide_id: str
    error_type: str
    message: str
    traceback: str = ""
    time: str = dataclasses.field(default_factory=_now)

    @classmethod
    def of(cls, spec: inputs.SlideSpec, error: BaseException) -> Failure:
        """The failure of `spec` by `error`; the traceback is kept unless it is a `UserError` (bad input,
        whose message says it all)."""
        trace = "" if isinstance(error, errors.UserError) else "".join(traceback.format_exception(error))
        return cls(spec.path, spec.slide_id, type(error).__name__, str(error), trace[-TRACEBACK_CHARS:])

    @classmethod
    def kind(cls, spec: inputs.SlideSpec, error_type: str, message: str) -> Failure:
        """A failure that is no exception here (`READER_CRASH`, `NO_RESULT`, `INCOMPLETE_READ`)."""
        return cls(spec.path, spec.slide_id, error_type, message)

    def record(self) -> dict:
        """The `failures.jsonl` line (and `data_prep`'s `{slide_id}.failed.json` marker) as a dict."""
        record = {"slide": self.slide, "slide_id": self.slide_id, "status": "failed", "error_type": self.error_type,
                  "message": self.message, "time": self.time}
        if self.traceback:
            record["traceback"] = self.traceback
        return record

    @classmethod
    def from_record(cls, record: dict) -> Failure:
        """Inverse of `record()`; KeyError if a required key is missing."""
        return cls(record["slide"], record["slide_id"], record["error_type"], record["message"],
                   record.get("traceback", ""), record.get("time", ""))


def write_failures(out_dir: str | os.PathLike, failures: Iterable[Failure]) -> str:
    """Writes `out_dir/failures.jsonl` (one `record()` a line; empty when none) atomically; returns its path."""
    path = os.path.join(out_dir, FAILURES_FILE)
    atomic.write_text(path, "".join(json.dumps(f.record()) + "\n" for f in failures))
    return path


def count_by_type(failures: Iterable[Failure]) -> dict[str, int]:
    """`{error_type: number of failures}` in first-seen order (a job summary's `failures_by_type`)."""
    counts: dict[str, int] = {}
    for f in failures:
        counts[f.error_type] = counts.get(f.error_type, 0) + 1
    return counts
