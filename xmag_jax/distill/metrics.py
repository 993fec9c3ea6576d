"""Training observability: per-step JSONL + TensorBoard on process 0, a progress line, throughput and MFU.

Units: `step_time_s` in seconds per optimizer update (wall clock between two finished steps, input
pipeline included), `pairs_per_s` in tile pairs per second over all devices, `model_tflops_per_s` in
model TFLOP/s over all devices (the step's model FLOPs, not XLA's executed FLOPs), `mfu` as a fraction of
the devices' summed dense bf16 peak (`xmag_jax.chips`; absent where none is known, e.g. a CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from xmag_jax import atomic

METRICS_FILE = "metrics.jsonl"
METRICS_PARTS_DIR = "metrics.parts"  # object stores (gs://): append-only parts, see MetricWriter
TENSORBOARD_DIR = "tensorboard"


class NonFiniteLossError(FloatingPointError):
    """A loss or norm became NaN/Inf at `step`; the state of that step is never checkpointed."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
    """Raise `NonFiniteLossError` naming `step` and the offending metrics if any value is NaN or Inf."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteLossError(f"non-finite training metrics at step {step}: {shown}", step)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (blocks until the step that produced them has finished)."""
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


class Throughput:
    """Step time, pairs/s, model TFLOP/s and MFU from the wall time between finished steps; with `views` > 1
    augmented views per pair also `views_per_s` (pairs/s x views, the images the student sees per second).
    `flops_per_step` is the whole step's, views included (`flops.step_flops`). `peak_flops_per_device` (FLOP/s,
    `chips.peak_flops_per_device`) is None where no peak is known (a CPU): MFU is then left out, not made up."""

    def __init__(self, *, batch_size: int, flops_per_step: float, peak_flops_per_device: float | None,
                 device_count: int, views: int = 1):
        self.batch_size = batch_size
        self.views = views
        self.flops_per_step = flops_per_step
        self.peak_tflops = None if peak_flops_per_device is None else peak_flops_per_device * device_count / 1e12
        self._last: float | None = None

    def reset(self) -> None:
        """Forget the last time stamp (after a pause such as a checkpoint save or the first compile)."""
        self._last = None

    def tick(self) -> dict[str, float]:
        """Call once per finished step; returns {} for the first step after a reset."""
        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None:
            return {}
        return self.rates(now - last)

    def rates(self, step_time_s: float) -> dict[str, float]:
        tflops = self.flops_per_step / step_time_s / 1e12
        rates = {
            "step_time_s": step_time_s,
            "pairs_per_s": self.batch_size / step_time_s,
            "model_tflops_per_s": tflops,
        }
        if self.peak_tflops is not None:
            rates["mfu"] = tflops / self.peak_tflops
        if self.views > 1:
            rates["views_per_s"] = self.views * rates["pairs_per_s"]
        return rates


def progress_line(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
    """`step 120/400 | loss/global 0.1 | ... | 0.512 s/step | 1234.0 pairs/s | MFU 35.2%`, loss terms first."""
    parts = [f"step {step}/{total_steps}"]
    losses_first = sorted(metrics, key=lambda k: not k.startswith("loss"))
    for key, value in ((k, metrics[k]) for k in losses_first):
        if key == "mfu":
            parts.append(f"MFU {100 * value:.1f}%")
        elif key == "step_time_s":
            parts.append(f"{value:.3f} s/step")
        elif key == "pairs_per_s":
            parts.append(f"{value:.1f} pairs/s")
        elif key == "views_per_s":
            parts.append(f"{value:.1f} views/s")
        elif key == "model_tflops_per_s":
            parts.append(f"{value:.3g} TFLOP/s")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


class MetricWriter:
    """One JSON line per step, TensorBoard scalars at log points (process 0 only); lines are only ever added.

    Each line: `{"step": int, <metric>: float, ..., "record_index": [int, ...]?}`. On a local (or mounted)
    workdir the lines go to `workdir/metrics.jsonl`, appended and flushed every step. Object stores (gs://)
    cannot append, so there the lines since the last log point are written at each log point (and at
    `close()`) as one new object `workdir/metrics.parts/{first:010d}-{last:010d}.jsonl`: the cost of a log
    point is its own lines, never the whole history. `read_metrics` reads either layout.
    """

    def __init__(self, workdir: epath.PathLike, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / METRICS_FILE
        self.parts = epath.Path(workdir) / METRICS_PARTS_DIR
        self._remote = atomic.is_object_store(workdir)
        self._pending: list[tuple[int, str]] = []  # object stores: lines not yet in a part
        self._file = None
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self._tb = SummaryWriter(logdir=os.fspath(epath.Path(workdir) / TENSORBOARD_DIR))

    def resume_at(self, step: int) -> None:
        """Drop lines of steps after `step` (written by a run killed after its last checkpoint)."""
        if not self.active:
            return
        if self.path.exists():
            atomic.write_text(self.path, "".join(f"{ln}\n" for ln in _lines_up_to(self.path.read_text(), step)))
        for part in _part_files(self.parts):
            first, last = (int(x) for x in part.stem.split("-"))
            if first > step:
                part.unlink()
            elif last > step:  # the one part that straddles the checkpoint: rewritten once, at start-up
                kept = _lines_up_to(part.read_text(), step)
                part.unlink()
                if kept:
                    self._write_part(kept, first, json.loads(kept[-1])["step"])

    def write(self, step: int, metrics: Mapping[str, float], *, record_index: np.ndarray | None = None,
              log_point: bool = False) -> None:
        """Record `step`; at a `log_point` also TensorBoard scalars (and, on object stores, a new part)."""
        if not self.active:
            return
        entry: dict[str, Any] = {"step": step, **metrics}
        if record_index is not None:
            entry["record_index"] = [int(i) for i in np.asarray(record_index).reshape(-1)]
        line = json.dumps(entry)
        if self._remote:
            self._pending.append((step, line))
            if log_point:
                self._flush_part()
        else:
            if self._file is None:
                self._file = self.path.open("a")
            self._file.write(line + "\n")
            self._file.flush()
        if log_point and self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()

    def _flush_part(self) -> None:
        if self._pending:
            self._write_part([ln for _, ln in self._pending], self._pending[0][0], self._pending[-1][0])
            self._pending = []

    def _write_part(self, lines: list[str], first: int, last: int) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        (self.parts / f"{first:010d}-{last:010d}.jsonl").write_text("".join(f"{ln}\n" for ln in lines))

    def close(self) -> None:
        self._flush_part()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _lines_up_to(text: str, step: int) -> list[str]:
    """The lines of `text` up to `step`, stopping at a line cut by a kill (what follows it is from lost steps)."""
    kept = []
    for ln in (ln for ln in text.splitlines() if ln.strip()):
        try:
            if json.loads(ln)["step"] > step:
                break
        except (json.JSONDecodeError, KeyError):
            break
        kept.append(ln)
    return kept


def _part_files(parts: epath.Path) -> list[epath.Path]:
    return sorted(parts.glob("*.jsonl")) if parts.exists() else []


def read_metrics(workdir: epath.PathLike) -> list[dict[str, Any]]:
    """The JSONL lines of a run, in order (`metrics.jsonl`, then any object-store parts)."""
    path = epath.Path(workdir) / METRICS_FILE
    texts = [path.read_text()] if path.exists() else []
    texts += [part.read_text() for part in _part_files(epath.Path(workdir) / METRICS_PARTS_DIR)]
    return [json.loads(ln) for text in texts for ln in text.splitlines() if ln.strip()]


def log_progress(step: int, total_steps: int, metrics: Mapping[str, float]) -> None:
    if jax.process_index() == 0:
        logging.info("%s", progress_line(step, total_steps, metrics))
