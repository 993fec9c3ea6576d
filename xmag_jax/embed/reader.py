"""Reading slides for `xmag_jax.embed` (no JAX): threaded tile reads into fixed-shape batches, and the same
in a child process so that a decoder crash fails one slide, not the job.

`isolated_batches` runs `read_batches` in a spawned child and passes plans and failures through a pipe,
and batch images through `prefetch + 2` shared-memory slots (one copy on each side; a pickled batch
through the pipe was ~6x slower). The child's planning thread names the slide it is reading in shared
memory, so when the child dies the death is read as `xmag_jax.wsi.isolation` reads it (as data_prep does):
- of a fault signal, the slide being read is failed (`ReaderCrash`) and a new child goes on with the
  slides after it (a fault in a reading thread stops that slide's reads at once, so the blame is exact;
  the same signal sent by another process can arrive after the reader moved on);
- of anything else, nothing is blamed: a new child re-reads the unfinished slides, up to
  `isolation.MAX_KILLS` deaths in a row without a slide finished (then `isolation.ReaderKilledError`).
A slide whose tiles were partly passed on before a death is read again from its plan; consumers take a
second `SlidePlan` for a slide as "start this slide over".
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from xmag_jax.embed.plan import SlidePlan, Tiling, plan_slide
from xmag_jax.wsi import inputs, isolation, slide_reader
from xmag_jax.wsi.failures import Failure

READER_ADVICE = "lower --workers, --prefetch or --batch, or give the job more memory"


@dataclasses.dataclass
class Batch:
    """uint8 `images [B, patch_px, patch_px, 3]`; `segments`: (slide_id, tile count) of its rows in order,
    across slide boundaries; rows after the last segment are zero padding (only in the job's last batch)."""

    images: np.ndarray
    segments: list[tuple[str, int]]


class _End:
    """Sentinel after the last item."""


@dataclasses.dataclass(frozen=True)
class _SlotBatch:
    """A batch whose images the child put in shared-memory slot `slot`."""

    slot: int
    segments: list[tuple[str, int]]


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


def read_batches(specs: list[inputs.SlideSpec], tiling: Tiling, batch: int, *, workers: int = 4,
                 prefetch: int = 4, on_slide: Callable[[int], None] | None = None
                 ) -> Iterator[SlidePlan | Batch | Failure]:
    """Each slide's `SlidePlan` (or `Failure`) in order, and all tiles as fixed-shape `Batch`es that run
    across slide boundaries (a batch holds tiles of slides whose plans came before it).

    A background thread opens and plans the slides; `workers` threads (each with its own slide handle)
    read tiles about two batches ahead; at most `prefetch` items wait in the queue. `on_slide(i)` (if
    given) is called from that thread as it starts reading `specs[i]`, and with -1 when reading ends.
    """
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    on_slide = on_slide or (lambda i: None)

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
            for i, spec in enumerate(specs):
                if stop.is_set():
                    break
                handles: list[slide_reader.Slide] = []
                on_slide(i)
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
                    put(Failure.of(spec, e))
                finally:
                    for h in handles:
                        h.close()
        on_slide(-1)
        if (last := builder.flush()) is not None:
            put(last)
        put(_End())

    thread = threading.Thread(target=produce, name="embed-plan", daemon=True)
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


def isolated_batches(specs: list[inputs.SlideSpec], tiling: Tiling, batch: int, *, workers: int = 4,
                     prefetch: int = 4, read: Callable[..., Iterator] = read_batches,
                     max_kills: int = isolation.MAX_KILLS) -> Iterator[SlidePlan | Batch | Failure]:
    """`read(specs, tiling, batch, ...)`'s items (by default `read_batches`), read in a child process; see
    the module doc for what a death of the child does. `read` must be importable by the child (a
    module-level function)."""
    context = isolation.CONTEXT
    shape = (batch, tiling.patch_px, tiling.patch_px, 3)
    slots = [context.RawArray("B", int(np.prod(shape))) for _ in range(prefetch + 2)]
    todo, kills = list(specs), isolation.KillCount(READER_ADVICE, max_kills)
    while todo:
        current = context.Value("i", -1, lock=False)
        free = context.SimpleQueue()  # slots the child may fill
        for i in range(len(slots)):
            free.put(i)
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_child, name="embed-reader", daemon=True,
                                args=(sender, read, todo, tiling, batch, workers, prefetch, current, slots, free))
        child.start()
        sender.close()
        left: dict[str, int | None] = {s.slide_id: None for s in todo}  # slide_id -> tiles still to come
        try:
            while True:
                try:
                    item = receiver.recv()
                except EOFError:  # the child died
                    break
                if isinstance(item, _End):
                    child.join()
                    return
                if isinstance(item, isolation.ChildError):
                    item.reraise()
                if isinstance(item, _SlotBatch):
                    images = np.frombuffer(slots[item.slot], np.uint8).reshape(shape).copy()
                    free.put(item.slot)
                    item = Batch(images, item.segments)
                _account(item, left)
                yield item
        finally:
            receiver.close()
            if child.is_alive():
                child.kill()
            child.join()
        index, death = current.value, isolation.Death(child.exitcode)
        finished = [s for s in todo if s.slide_id not in left]
        unfinished = [s for s in todo if s.slide_id in left]
        if finished:
            kills.progressed()
        if death.fault is not None and 0 <= index < len(todo) and todo[index].slide_id in left:
            culprit = todo[index]
            yield isolation.crash_failure(culprit, death)
            todo = [s for s in unfinished if s is not culprit]
            kills.progressed()
            continue
        kills.killed(death, f"the {len(unfinished)} unfinished slide(s)")
        todo = unfinished


def _account(item: SlidePlan | Batch | Failure, left: dict[str, int | None]) -> None:
    """Removes from `left` the slides whose every tile (or failure) has now been passed on."""
    if isinstance(item, Failure):
        left.pop(item.slide_id, None)
    elif isinstance(item, SlidePlan):
        left[item.spec.slide_id] = len(item.coords)
    else:
        for slide_id, n in item.segments:
            left[slide_id] -= n
    for slide_id in [k for k, n in left.items() if n == 0]:
        del left[slide_id]


def _child(sender, read: Callable[..., Iterator], specs: list[inputs.SlideSpec], tiling: Tiling, batch: int,
           workers: int, prefetch: int, current, slots: list, free) -> None:
    """The reader process: `read`'s items into the pipe (batch images into a free slot), `current.value` =
    index of the slide being read."""
    def on_slide(i: int) -> None:
        current.value = i

    try:
        for item in read(specs, tiling, batch, workers=workers, prefetch=prefetch, on_slide=on_slide):
            if isinstance(item, Batch):
                slot = free.get()
                np.frombuffer(slots[slot], np.uint8).reshape(item.images.shape)[...] = item.images
                item = _SlotBatch(slot, item.segments)
            sender.send(item)
        sender.send(_End())
    except BaseException:  # noqa: BLE001 - a bug here is passed to the parent, which raises it
        sender.send(isolation.ChildError.current())
        raise
