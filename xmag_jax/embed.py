"""Slide embeddings: tissue tiles at a target µm/px through a ViT, one TRIDENT-layout h5 per slide.

    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --checkpoint ckpt/student           # student, 5x
    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --model uni2_h --weights W --mpp 0.5  # teacher, 20x

Per slide: CLAM-style tissue mask and a grid of non-overlapping `--patch-px` tiles at `--mpp` µm/px
(`data_prep.tissue`), tiles read from the best pyramid level (`data_prep.slide_reader`) by background
threads into a bounded queue while the device computes, a jitted forward on fixed-shape batches that
run across slide boundaries (only the job's last one is zero-padded; one compile), sharded over the
local devices along the batch.

Output `OUT/{slide_id}.h5`: `features [N, D]` float32 and `coords [N, 2]` int64 level-0 top-left (x, y),
with attrs (on the file and on `coords`, as TRIDENT) `patch_size` (px at the target), `patch_size_level0`,
`mpp`, `target_magnification`, `level0_mpp`, `level0_magnification`, `encoder`, `name`. Files are
written under a temp name and renamed; slides whose h5 exists with the same encoder and µm/px are
skipped (resume); a slide that fails is recorded in `OUT/failures.jsonl` and the job goes on; a slide
without tissue gets an empty h5 (N = 0) and a warning. A slide that kills the process itself (a segfault
in a decoder) is named by `OUT/.reading.json`; the next run retries it, and after `MAX_DEATHS` deaths
records it as failed and skips it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import queue
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator

import h5py
import jax
import numpy as np
import tqdm

from data_prep import inputs, slide_reader, tissue
from xmag_jax import atomic, encoders

FAILURES_FILE = "failures.jsonl"
READING_FILE = ".reading.json"  # the slide being read; left behind only if the process died
DEATHS_FILE = ".deaths.json"  # slide_id -> runs that died while reading it
MAX_DEATHS = 2  # a slide that killed this many runs is recorded as failed and skipped


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles of `patch_px` px at `mpp` µm/px; fields kept with tissue fraction >= `min_tissue`."""

    mpp: float
    patch_px: int = 224
    min_tissue: float = 0.25


@dataclasses.dataclass
class SlidePlan:
    spec: inputs.SlideSpec
    coords: np.ndarray  # int64 [N, 2] level-0 top-left (x, y)
    field_level0: int
    level0_mpp: float


@dataclasses.dataclass
class Batch:
    """uint8 `images [B, patch_px, patch_px, 3]`; `segments`: (slide_id, tile count) of its rows in order,
    across slide boundaries; rows after the last segment are zero padding (only in the job's last batch)."""

    images: np.ndarray
    segments: list[tuple[str, int]]


@dataclasses.dataclass
class Failure:
    spec: inputs.SlideSpec
    error: BaseException


class _End:
    """Sentinel after the last item."""


class _BatchBuilder:
    def __init__(self, batch: int, patch_px: int):
        self.shape = (batch, patch_px, patch_px, 3)
        self._reset()

    def _reset(self) -> None:
        self.images, self.n, self.segments = np.zeros(self.shape, np.uint8), 0, []  # a fresh buffer each time:
        # the previous one may back a device array still in use

    def add(self, slide_id: str, image: np.ndarray) -> Batch | None:
        self.images[self.n] = image
        self.n += 1
        if self.segments and self.segments[-1][0] == slide_id:
            self.segments[-1] = (slide_id, self.segments[-1][1] + 1)
        else:
            self.segments.append((slide_id, 1))
        return self.flush() if self.n == self.shape[0] else None

    def drop(self, slide_id: str) -> None:
        """Forget the not-yet-emitted tiles of `slide_id` (always the last segment)."""
        if self.segments and self.segments[-1][0] == slide_id:
            self.n -= self.segments.pop()[1]
            self.images[self.n:] = 0

    def flush(self) -> Batch | None:
        batch = Batch(self.images, self.segments) if self.n else None
        self._reset()
        return batch


def plan_slide(slide: slide_reader.Slide, spec: inputs.SlideSpec, tiling: Tiling) -> SlidePlan:
    """Tissue mask and the grid of fields of `patch_px · mpp / level0_mpp` level-0 px."""
    field = int(round(tiling.patch_px * tiling.mpp / slide.mpp))
    if field < tiling.patch_px * 0.99:
        raise slide_reader.ResolutionError(
            f"{spec.path}: level 0 is {slide.mpp:g} µm/px, coarser than the requested {tiling.mpp:g} µm/px")
    _, mask, downsample = tissue.slide_mask(slide)
    grid = tissue.tile_grid(slide.dimensions, field, mask, downsample, tiling.min_tissue)
    return SlidePlan(spec, grid.coords, field, slide.mpp)


def read_batches(specs: list[inputs.SlideSpec], tiling: Tiling, batch: int, *, workers: int = 4,
                 prefetch: int = 4, marker: pathlib.Path | None = None) -> Iterator[SlidePlan | Batch | Failure]:
    """Each slide's `SlidePlan` (or `Failure`) in order, and all tiles as fixed-shape `Batch`es that run
    across slide boundaries (a batch holds tiles of slides whose plans came before it).

    A background thread opens and plans the slides; `workers` threads (each with its own slide handle)
    read tiles about two batches ahead; at most `prefetch` items wait in the queue. `marker` (if given)
    names the slide being read while it is read, and is removed when reading ends in any way short of the
    process dying (a crash in a codec, a kill), so what it names after a death is the likely culprit.
    """
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        builder = _BatchBuilder(batch, tiling.patch_px)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="embed-read") as pool:
            for spec in specs:
                if stop.is_set():
                    break
                handles: list[slide_reader.Slide] = []
                if marker is not None:
                    _write_json(marker, {"slide_id": spec.slide_id, "path": spec.path})
                try:
                    handles.append(slide_reader.open_slide(spec.path, spec.mpp, spec.slide_id))
                    plan = plan_slide(handles[0], spec, tiling)
                    handles += [slide_reader.open_slide(spec.path, spec.mpp, spec.slide_id)
                                for _ in range(min(workers, len(plan.coords)) - 1)]
                    put(plan)
                    for image in _read_tiles(pool, handles, plan, tiling, 2 * batch, stop):
                        if (full := builder.add(spec.slide_id, image)) is not None:
                            put(full)
                except Exception as e:  # a bad slide is reported and skipped; the job goes on
                    builder.drop(spec.slide_id)
                    put(Failure(spec, e))
                finally:
                    for h in handles:
                        h.close()
        if (last := builder.flush()) is not None:
            put(last)
        put(_End())

    def produce_and_unmark() -> None:
        try:
            produce()
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    thread = threading.Thread(target=produce_and_unmark, name="embed-plan", daemon=True)
    thread.start()
    try:
        while not isinstance(item := out.get(), _End):
            yield item
    finally:
        stop.set()
        thread.join()


def _read_tiles(pool, handles: list[slide_reader.Slide], plan: SlidePlan, tiling: Tiling, ahead: int,
                stop: threading.Event) -> Iterator[np.ndarray]:
    """The slide's tiles (uint8 `[patch_px, patch_px, 3]`) in grid order, with `ahead` reads in flight."""
    free: queue.Queue = queue.Queue()
    for h in handles:
        free.put(h)

    def read(xy: np.ndarray) -> np.ndarray:
        handle = free.get()
        try:
            return slide_reader.read_field(handle, int(xy[0]), int(xy[1]), plan.field_level0, tiling.patch_px)
        finally:
            free.put(handle)

    window: collections.deque = collections.deque()
    coords = iter(plan.coords)
    try:
        for xy in coords:
            window.append(pool.submit(read, xy))
            if len(window) >= ahead:
                break
        while window and not stop.is_set():
            image = window.popleft().result()
            if (xy := next(coords, None)) is not None:
                window.append(pool.submit(read, xy))
            yield image
    finally:  # no read may outlive the slide handles, which the caller closes next
        for f in window:
            f.cancel()
        concurrent.futures.wait(window)


def h5_attrs(plan: SlidePlan, tiling: Tiling, encoder_name: str, embed_dim: int) -> dict:
    """TRIDENT's coords attrs plus the encoder, the µm/px and the embedding size."""
    return {
        "patch_size": tiling.patch_px,
        "patch_size_level0": plan.field_level0,
        "mpp": tiling.mpp,
        "target_magnification": round(10.0 / tiling.mpp, 3),
        "level0_mpp": plan.level0_mpp,
        "level0_magnification": round(10.0 / plan.level0_mpp, 3),
        "overlap": 0,
        "min_tissue": tiling.min_tissue,
        "encoder": encoder_name,
        "embed_dim": embed_dim,
        "name": plan.spec.slide_id,
        "slide_path": os.path.abspath(plan.spec.path),
    }


def write_h5(path: pathlib.Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    """`features [N, D]` float32 and `coords [N, 2]` int64 with `attrs`, written to a temp file and renamed."""
    with atomic.target(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v
            c.attrs[k] = v


def is_done(path: pathlib.Path, encoder_name: str, tiling: Tiling) -> bool:
    """True if `path` is a complete h5 from the same encoder and tiling; an h5 from another one is an error."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            made_by = (f.attrs.get("encoder"), float(f.attrs.get("mpp", -1)), int(f.attrs.get("patch_size", -1)),
                       float(f.attrs.get("min_tissue", -1)))
    except OSError:
        return False  # unreadable: redo it
    wanted = (encoder_name, tiling.mpp, tiling.patch_px, tiling.min_tissue)
    if made_by != wanted:
        raise FileExistsError(f"{path} was made with (encoder, µm/px, patch px, min tissue) = {made_by}, this run is "
                              f"{wanted}: use another --out")
    return True


@dataclasses.dataclass
class Report:
    """What a run did. `seconds`: wall time of the embedding loop (after the compile)."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    empty: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0


def embed_slides(specs: list[inputs.SlideSpec], encoder: encoders.Encoder, out_dir: str | os.PathLike,
                 tiling: Tiling, *, batch: int = 64, workers: int = 4, prefetch: int = 4,
                 progress: bool = True) -> Report:
    """Embed every slide not already done into `out_dir`; failures go to `out_dir/failures.jsonl`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_dev = len(jax.local_devices())
    batch = -(-batch // n_dev) * n_dev
    report = Report()
    deaths = _count_deaths(out_dir)
    todo = []
    for spec in specs:
        if is_done(out_dir / f"{spec.slide_id}.h5", encoder.name, tiling):
            report.skipped.append(spec.slide_id)
        elif deaths.get(spec.slide_id, 0) >= MAX_DEATHS:
            _record_failure(out_dir, spec, ProcessDiedError(
                f"{spec.path}: {deaths[spec.slide_id]} earlier runs died while reading this slide (a crash in a "
                f"decoder?); remove its entry from {out_dir / DEATHS_FILE} to try again"), report)
        else:
            todo.append(spec)
    if not todo:
        return report
    t0 = time.perf_counter()
    jax.block_until_ready(encoder.forward(np.zeros((batch, tiling.patch_px, tiling.patch_px, 3), np.uint8)))
    report.compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=len(todo), unit="slide", disable=not progress, desc=f"embed @{tiling.mpp:g}µm/px")
    slides: dict[str, _SlideFeatures] = {}

    def finish(slide_id: str) -> None:
        state = slides.pop(slide_id)
        try:
            feats = state.features(encoder.embed_dim)
            write_h5(out_dir / f"{slide_id}.h5", feats, state.plan.coords,
                     h5_attrs(state.plan, tiling, encoder.name, encoder.embed_dim))
        except Exception as e:
            _record_failure(out_dir, state.plan.spec, e, report)
        else:
            report.done.append(slide_id)
            report.tiles[slide_id] = len(feats)
            if not len(feats):
                report.empty.append(slide_id)
                warnings.warn(f"{state.plan.spec.path}: no tissue tiles at {tiling.mpp:g} µm/px; wrote an empty h5",
                              stacklevel=3)
        bar.set_postfix(tiles=sum(report.tiles.values()), failed=len(report.failed), refresh=False)
        bar.update(1)

    for item in read_batches(todo, tiling, batch, workers=workers, prefetch=prefetch, marker=out_dir / READING_FILE):
        if isinstance(item, SlidePlan):
            slides[item.spec.slide_id] = _SlideFeatures(item)
            if not len(item.coords):
                finish(item.spec.slide_id)
        elif isinstance(item, Batch):
            out, row = encoder.forward(item.images), 0
            for slide_id, n in item.segments:
                if slide_id in slides and slides[slide_id].add(out, row, n):
                    finish(slide_id)
                row += n
        else:
            slides.pop(item.spec.slide_id, None)
            _record_failure(out_dir, item.spec, item.error, report)
            bar.update(1)
    for state in slides.values():  # only if the reader stopped early
        _record_failure(out_dir, state.plan.spec, RuntimeError(f"{state.count} of {len(state.plan.coords)} tiles read"),
                        report)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


class ProcessDiedError(RuntimeError):
    """Earlier runs died (segfault, kill) while reading this slide."""


def _write_json(path: pathlib.Path, obj) -> None:
    with atomic.target(path) as tmp:
        tmp.write_text(json.dumps(obj))


def _count_deaths(out_dir: pathlib.Path) -> dict[str, int]:
    """`slide_id -> deaths`, adding one for the slide a left-behind reading marker names (then removed)."""
    deaths_file, marker = out_dir / DEATHS_FILE, out_dir / READING_FILE
    deaths = json.loads(deaths_file.read_text()) if deaths_file.exists() else {}
    if marker.exists():
        slide_id = json.loads(marker.read_text())["slide_id"]
        deaths[slide_id] = deaths.get(slide_id, 0) + 1
        _write_json(deaths_file, deaths)
        marker.unlink()
        warnings.warn(f"the last run in {out_dir} died while reading slide {slide_id!r} "
                      f"({deaths[slide_id]} time(s); skipped from {MAX_DEATHS})", stacklevel=3)
    return deaths


class _SlideFeatures:
    """Rows of device batches that hold one slide's features, until all `len(plan.coords)` arrived."""

    def __init__(self, plan: SlidePlan):
        self.plan, self.parts, self.count = plan, [], 0

    def add(self, out: jax.Array, row: int, n: int) -> bool:
        self.parts.append((out, row, n))
        self.count += n
        return self.count == len(self.plan.coords)

    def features(self, dim: int) -> np.ndarray:
        """`float32 [N, dim]` (blocks until the device has computed them)."""
        rows = [np.asarray(out)[row:row + n] for out, row, n in self.parts]
        return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)


def _record_failure(out_dir: pathlib.Path, spec: inputs.SlideSpec, error: BaseException, report: Report) -> None:
    report.failed.append(spec.slide_id)
    entry = {"slide_id": spec.slide_id, "path": spec.path, "error": type(error).__name__, "message": str(error),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "traceback": "".join(traceback.format_exception(error))[-2000:]}
    with open(out_dir / FAILURES_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    warnings.warn(f"{spec.path}: {type(error).__name__}: {error} (recorded in {out_dir / FAILURES_FILE})", stacklevel=3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xmag_jax.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", required=True, help="folder of slides, or CSV manifest (path[,slide_id,mpp])")
    p.add_argument("--out", required=True, help="output folder of {slide_id}.h5")
    encoders.add_args(p)
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px (2.0 ≈ 5x, 0.5 ≈ 20x)")
    p.add_argument("--patch-px", type=int, default=224, help="tile side in px at --mpp")
    p.add_argument("--tissue-threshold", type=float, default=0.25, help="min tissue fraction of a kept tile")
    p.add_argument("--batch", type=int, default=64, help="tiles per forward (rounded up to a multiple of devices)")
    p.add_argument("--workers", type=int, default=4, help="tile reader threads")
    p.add_argument("--prefetch", type=int, default=4, help="batches read ahead")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    try:
        specs = inputs.list_slides(args.slides)
        encoder = encoders.from_args(args)
        tiling = Tiling(args.mpp, args.patch_px, args.tissue_threshold)
        report = embed_slides(specs, encoder, args.out, tiling, batch=args.batch, workers=args.workers,
                              prefetch=args.prefetch, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad arguments, not a bad slide
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_tiles = sum(report.tiles.values())
    print(f"{encoder.name} @ {args.mpp:g} µm/px -> {args.out}: {len(report.done)} embedded ({n_tiles} tiles, "
          f"{len(report.empty)} empty), {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s (+{report.compile_seconds:.1f}s compile)")
    if report.failed:
        print(f"failures: {report.failed} (see {os.path.join(args.out, FAILURES_FILE)})")
    return 1 if report.failed and not report.done and not report.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
