"""Inputs of end-to-end training: bag tiles by slide, labels and slide-level folds, and the per-step sample.

The sample of step `s` of fold `k` is a pure function of (seed, k, s): epoch `e = (s - 1) // steps_per_epoch`
permutes the training slides with a generator seeded (seed, k, e); each slide draws its tiles without
replacement and each tile its augmentation with a generator seeded (seed, k, s, slide position). A run
restored at step `s` therefore sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import simplejpeg
from absl import logging
from array_record.python import array_record_module
from sklearn import model_selection

from xmag_jax.data import augment
from xmag_jax.errors import UserError
from xmag_jax.formats import bag_records


class LabelsError(UserError, ValueError):
    """A labels CSV that cannot be trained on (the message names the file and what was expected)."""


class Bags:
    """Random access to a bag dataset's tiles: `tiles(slide_id, index) -> uint8 [n, P, P, 3]`."""

    def __init__(self, directory: str):
        self.directory = directory
        self.slides = bag_records.read_slides(directory)
        try:
            paths = bag_records.shard_paths(directory)
        except (FileNotFoundError, ValueError) as err:
            raise bag_records.BagsError(str(err)) from None
        self._readers = [array_record_module.ArrayRecordReader(p) for p in paths]
        self._starts = np.cumsum([0] + [r.num_records() for r in self._readers])
        total = sum(e.tiles for e in self.slides.values())
        if total != self._starts[-1]:
            raise bag_records.BagsError(f"{directory}: slides.csv lists {total} tiles, the shards hold "
                                        f"{self._starts[-1]}; rerun data_prep.tile_bags")
        sizes = {e.patch_px for e in self.slides.values()}
        self.patch_px = sizes.pop() if len(sizes) == 1 else 0

    def records(self, slide_id: str, index: np.ndarray) -> list[dict]:
        """Decoded records (`bag_records.decode_tile`, image as JPEG bytes) of tiles `index` (ascending)."""
        entry = self.slides[slide_id]
        glob = entry.first + np.asarray(index, np.int64)
        shard = np.searchsorted(self._starts, glob, side="right") - 1
        out = []
        for s in np.unique(shard).tolist():  # one read per shard, in the order asked
            local = (glob[shard == s] - self._starts[s]).tolist()
            out += [bag_records.decode_tile(r) for r in self._readers[s].read(local)]
        return out

    def tiles(self, slide_id: str, index: np.ndarray) -> np.ndarray:
        """uint8 `[len(index), P, P, 3]` RGB tiles of the slide."""
        return np.stack([simplejpeg.decode_jpeg(r["image"], colorspace="RGB")
                         for r in self.records(slide_id, index)])

    def coords(self, slide_id: str) -> np.ndarray:
        """int64 `[N, 2]` level-0 top-left (x, y) of all the slide's tiles."""
        recs = self.records(slide_id, np.arange(self.slides[slide_id].tiles))
        return np.array([(r["x"], r["y"]) for r in recs], np.int64).reshape(-1, 2)

    def close(self) -> None:
        for r in self._readers:
            r.close()


@dataclasses.dataclass(frozen=True)
class Cohort:
    """The labelled slides in a stable order: `slide_ids [B]`, `y int [B]` class index, `fold int [B]`."""

    slide_ids: list[str]
    y: np.ndarray
    classes: list[str]
    fold: np.ndarray

    @property
    def num_folds(self) -> int:
        return int(self.fold.max()) + 1


def read_cohort(labels_path: str, bags: Bags, folds: int, seed: int) -> Cohort:
    """Labels CSV (`slide_id,label[,fold]`) checked against the bags; folds from the CSV, else stratified by
    label (seeded). LabelsError for slides absent from the bags (listed), one class, or too few slides for
    `folds`; slides with zero tiles are left out with a warning."""
    try:
        with open(labels_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except OSError as err:
        raise LabelsError(f"{labels_path}: unreadable ({err.strerror})") from None
    if "slide_id" not in fields or "label" not in fields:
        raise LabelsError(f"{labels_path}: expected a header with slide_id,label[,fold], got {fields}")
    labels, given_folds = {}, {}
    for line, row in enumerate(rows, start=2):
        sid, label = (row["slide_id"] or "").strip(), (row["label"] or "").strip()
        if not sid or not label:
            raise LabelsError(f"{labels_path}:{line}: empty slide_id or label")
        labels[sid] = label
        if "fold" in fields:
            try:
                given_folds[sid] = int(row["fold"])
            except (TypeError, ValueError):
                raise LabelsError(f"{labels_path}:{line}: fold {row['fold']!r} is not an integer") from None
    absent = sorted(s for s in labels if s not in bags.slides)
    if absent:
        raise LabelsError(f"{labels_path}: {len(absent)} labelled slide(s) not in the bags {bags.directory}: "
                          f"{absent[:20]}{' ...' if len(absent) > 20 else ''}")
    empty = sorted(s for s in labels if bags.slides[s].tiles == 0)
    if empty:
        logging.warning("skipping %d slide(s) with zero tiles: %s", len(empty), empty)
    ids = sorted(s for s in labels if s not in empty)
    classes = sorted({labels[s] for s in ids})
    if len(classes) < 2:
        raise LabelsError(f"{labels_path}: one class only ({classes}); expected at least 2 labels")
    y = np.array([classes.index(labels[s]) for s in ids], np.int32)
    if given_folds:
        values = sorted({given_folds[s] for s in ids})
        if values != list(range(len(values))) or len(values) < 2:
            raise LabelsError(f"{labels_path}: column fold has values {values}; expected 0..k-1 with k >= 2")
        fold = np.array([given_folds[s] for s in ids], np.int32)
    else:
        per_class = int(np.bincount(y).min())
        if per_class < folds:
            raise LabelsError(f"{labels_path}: {per_class} slide(s) in the smallest class, fewer than "
                              f"data.folds={folds}; lower the folds or add a fold column")
        fold = np.zeros(len(ids), np.int32)
        cv = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
        for k, (_, test) in enumerate(cv.split(np.zeros(len(ids)), y)):
            fold[test] = k
    return Cohort(ids, y, classes, fold)


@dataclasses.dataclass
class Batch:
    """One step: `images uint8 [A, M * T, P, P, 3]` (A micro-steps of M slides x T tiles, tiles of a slide
    contiguous), `mask bool [A, M, T]` (False: padding of a slide with fewer tiles), `labels int32 [A, M]`."""

    images: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


class Sampler:
    """The training batches of one fold as a pure function of the step (see the module doc)."""

    def __init__(self, bags: Bags, slide_ids: list[str], y: np.ndarray, *, slides_per_step: int,
                 tiles_per_slide: int, grad_accum: int, options: augment.AugmentOptions, seed: int, fold: int):
        self.bags, self.slide_ids, self.y = bags, slide_ids, y
        self.s, self.t, self.a = slides_per_step, tiles_per_slide, grad_accum
        self.options, self.seed, self.fold = options, seed, fold
        self.steps_per_epoch = -(-len(slide_ids) // slides_per_step)

    def slides_at(self, step: int) -> np.ndarray:
        """Indices into `slide_ids` of step `step` (1-based): the epoch's permutation, wrapping at its end."""
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, self.fold, epoch]).permutation(len(self.slide_ids))
        return order[(pos * self.s + np.arange(self.s)) % len(order)]

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        """Step `step`'s batch; `images` holds only `rows` of each micro-step's `M * T` tiles (this process's
        share, `distributed.process_slice`): the other tiles are neither read nor decoded. The draws do not
        depend on `rows`, so the shares of all processes put together are the one-process batch."""
        p, m = self.bags.patch_px, self.s // self.a
        lo, hi, _ = rows.indices(m * self.t)
        images = np.zeros((self.a, hi - lo, p, p, 3), np.uint8)
        mask = np.zeros((self.s, self.t), bool)
        picked = self.slides_at(step)
        for j, i in enumerate(picked.tolist()):
            sid = self.slide_ids[i]
            rng = np.random.default_rng([self.seed, self.fold, step, j])
            n = self.bags.slides[sid].tiles
            index = np.sort(rng.choice(n, min(n, self.t), replace=False))
            draws = [augment.draw(self.options, rng) for _ in index]
            mask[j, : len(index)] = True
            micro, base = j // m, j % m * self.t
            first, last = max(lo - base, 0), min(hi - base, len(index))
            if first >= last:
                continue
            for row, tile in enumerate(self.bags.tiles(sid, index[first:last]), start=first):
                d = draws[row]
                images[micro, base + row - lo] = augment.apply_d4(augment.apply_photometric(tile, d), d.d4)
        return Batch(images, mask.reshape(self.a, m, self.t), self.y[picked].reshape(self.a, m).astype(np.int32))


def slide_chunks(bags: Bags, slide_id: str, chunk: int, rows: slice = slice(None)):
    """All tiles of a slide as `(uint8 [rows of chunk, P, P, 3] zero-padded, valid count of the whole chunk)`
    chunks, in order; `rows` is this process's share of a chunk (`distributed.process_slice`)."""
    n = bags.slides[slide_id].tiles
    lo, hi, _ = rows.indices(chunk)
    p = bags.patch_px
    for start in range(0, n, chunk):
        out = np.zeros((hi - lo, p, p, 3), np.uint8)
        index = np.arange(start + lo, min(start + hi, n))
        if len(index):
            out[: len(index)] = bags.tiles(slide_id, index)
        yield out, min(chunk, n - start)
