"""The embedding loop of `python -m xmag_jax.embed` (the CLI is `xmag_jax.embed.__main__`).

Per slide: CLAM-style tissue mask and a grid of non-overlapping `--patch_px` tiles at `--mpp` µm/px
(`xmag_jax.wsi.tissue`), tiles read from the best pyramid level (`xmag_jax.wsi.slide_reader`) by background
threads into a bounded queue while the device computes, a jitted forward on fixed-shape batches that
run across slide boundaries (only the job's last one is zero-padded; one compile), sharded over the
local devices along the batch.

Output `OUT/{slide_id}.h5`: `features [N, D]` float32 and `coords [N, 2]` int64 level-0 top-left (x, y),
with attrs (on the file and on `coords`, as TRIDENT) `patch_size` (px at the target), `patch_size_level0`,
`mpp`, `target_magnification`, `level0_mpp`, `level0_magnification`, `encoder`, `name`, and the
provenance fingerprints `weights_fingerprint` (digest of the encoder's parameters) and
`preprocessing_fingerprint` (µm/px, patch px, tissue settings, normalisation, embedding, compute dtype).

One job per `--out` (`workdir_lock`). Files are written under a temp name and renamed; a slide whose h5
exists with the same encoder name and fingerprints is skipped (resume); an h5 made by other weights or
settings is refused before anything runs (`--overwrite` re-embeds those slides). A slide that fails is
recorded in `OUT/failures.jsonl` (`xmag_jax.wsi.failures`, as data_prep; rewritten at each failure, it
lists the latest run's) and the job goes on; a slide without tissue gets an empty h5 (N = 0) and a warning.
Tiles are read in a child process (`reader.isolated_batches`, `xmag_jax.wsi.isolation`): a decoder crash
there fails that slide only; a reader killed from outside (OOM) is restarted without blaming a slide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tqdm

from xmag_jax import encoders, errors, models, workdir_lock
from xmag_jax.embed.plan import SlidePlan, Tiling
from xmag_jax.embed.reader import Batch, isolated_batches, read_batches
from xmag_jax.formats import feature_h5
from xmag_jax.wsi import failures, inputs, tissue
from xmag_jax.wsi.failures import Failure


class StaleFeaturesError(errors.UserError):
    """An h5 in `--out` was made by other weights or settings than this run."""


def preprocessing_fingerprint(tiling: Tiling, arch: models.Arch, tokens: int = 0) -> str:
    """16 hex digits over what turns a slide into the encoder's input and its output into the embedding:
    the tiling (µm/px, patch px, min tissue), the tissue mask settings, the normalisation, the embedding
    kind, the compute dtype and, when stored, the S x S token grid (`--tokens S`)."""
    fields = {"tiling": dataclasses.asdict(tiling), "mask": dataclasses.asdict(tissue.MaskParams()),
              "thumb_mpp": tissue.THUMBNAIL_MPP, "mean": arch.mean, "std": arch.std, "embedding": arch.embedding,
              "dtype": str(arch.vit.dtype)}
    if tokens:
        fields["tokens"] = tokens
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What made an h5: the encoder's name and the two fingerprints (computed once per job)."""

    encoder: str
    weights_fingerprint: str
    preprocessing_fingerprint: str

    @classmethod
    def of(cls, encoder: encoders.Encoder, tiling: Tiling, tokens: int = 0) -> Provenance:
        return cls(encoder.name, encoders.weights_fingerprint(encoder),
                   preprocessing_fingerprint(tiling, encoder.arch, tokens))


def h5_attrs(plan: SlidePlan, tiling: Tiling, made_by: Provenance, embed_dim: int) -> dict:
    """TRIDENT's coords attrs plus the encoder, its fingerprints, the µm/px and the embedding size."""
    return {
        "patch_size": tiling.patch_px,
        "patch_size_level0": plan.field_level0,
        "mpp": tiling.mpp,
        "target_magnification": round(10.0 / tiling.mpp, 3),
        "level0_mpp": plan.level0_mpp,
        "level0_magnification": round(10.0 / plan.level0_mpp, 3),
        "overlap": 0,
        "min_tissue": tiling.min_tissue,
        **dataclasses.asdict(made_by),
        "embed_dim": embed_dim,
        "name": plan.spec.slide_id,
        "slide_path": os.path.abspath(plan.spec.path),
    }


def is_done(path: pathlib.Path, made_by: Provenance, *, overwrite: bool = False) -> bool:
    """True if `path` is a complete h5 made by `made_by`. An h5 made otherwise raises StaleFeaturesError,
    or with `overwrite` is False (to be embedded again)."""
    if not path.exists():
        return False
    attrs = feature_h5.read_attrs(path)
    if attrs is None:
        return False  # unreadable: redo it
    found = {k: attrs.get(k) for k in dataclasses.asdict(made_by)}
    differ = [f"{k} {found[k] or 'not recorded'} (this run: {v})"
              for k, v in dataclasses.asdict(made_by).items() if found[k] != v]
    if differ and not overwrite:
        raise StaleFeaturesError(f"{path} was made by other weights or settings: {'; '.join(differ)}; use --overwrite "
                                 "to embed such slides again, or another --out")
    return not differ


@dataclasses.dataclass
class Report:
    """What a run did. `seconds`: wall time of the embedding loop (after the compile)."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    empty: list[str] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        """Ids of the slides that failed, in order."""
        return [f.slide_id for f in self.failures]


def embed_slides(specs: list[inputs.SlideSpec], encoder: encoders.Encoder, out_dir: str | os.PathLike,
                 tiling: Tiling, *, batch: int = 64, workers: int = 4, prefetch: int = 4, progress: bool = True,
                 overwrite: bool = False, isolate: bool = True, tokens: int = 0,
                 read: Callable[..., Iterator] = read_batches) -> Report:
    """Embed every slide not already done into `out_dir`, holding its lock; this run's failures are listed in
    `out_dir/failures.jsonl`. `overwrite`: re-embed slides whose h5 other weights/settings made (else an
    error). `isolate`: read tiles in a child process (`reader.isolated_batches`, which runs `read`).
    `tokens` = S > 0 also stores each tile's patch tokens average-pooled to S x S (`feature_h5.pool_tokens`)."""
    out_dir = pathlib.Path(out_dir)
    with workdir_lock.hold(out_dir, job="embed"):
        return _embed(specs, encoder, out_dir, tiling, batch=batch, workers=workers, prefetch=prefetch,
                      progress=progress, overwrite=overwrite, isolate=isolate, tokens=tokens, read=read)


def _embed(specs: list[inputs.SlideSpec], encoder: encoders.Encoder, out_dir: pathlib.Path, tiling: Tiling, *,
           batch: int, workers: int, prefetch: int, progress: bool, overwrite: bool, isolate: bool, tokens: int,
           read: Callable[..., Iterator]) -> Report:
    n_dev = len(jax.local_devices())
    batch = -(-batch // n_dev) * n_dev
    report = Report()
    made_by = Provenance.of(encoder, tiling, tokens)
    patch_grid = tiling.patch_px // encoder.arch.vit.patch_size
    todo = []
    for spec in specs:
        if is_done(out_dir / f"{spec.slide_id}.h5", made_by, overwrite=overwrite):
            report.skipped.append(spec.slide_id)
        else:
            todo.append(spec)
    failures.write_failures(out_dir, [])  # this run's failures, rewritten at each one
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
            feature_h5.write(out_dir / f"{slide_id}.h5", feats, state.plan.coords,
                     h5_attrs(state.plan, tiling, made_by, encoder.embed_dim),
                     tokens=state.tokens((tokens, tokens, encoder.arch.vit.embed_dim)) if tokens else None,
                     patch_grid=patch_grid)
        except Exception as e:
            _record_failure(out_dir, Failure.of(state.plan.spec, e), report)
        else:
            report.done.append(slide_id)
            report.tiles[slide_id] = len(feats)
            if not len(feats):
                report.empty.append(slide_id)
                warnings.warn(f"{state.plan.spec.path}: no tissue tiles at {tiling.mpp:g} µm/px; wrote an empty h5",
                              stacklevel=3)
        bar.set_postfix(tiles=sum(report.tiles.values()), failed=len(report.failed), refresh=False)
        bar.update(1)

    items = (isolated_batches(todo, tiling, batch, workers=workers, prefetch=prefetch, read=read) if isolate
             else read(todo, tiling, batch, workers=workers, prefetch=prefetch))
    for item in items:
        if isinstance(item, SlidePlan):  # a second plan for a slide (after a reader restart) starts it over
            slides[item.spec.slide_id] = _SlideFeatures(item)
            if not len(item.coords):
                finish(item.spec.slide_id)
        elif isinstance(item, Batch):
            if tokens:
                out, patches = encoder.forward_with_tokens(item.images)
                pooled = feature_h5.pool_tokens(np.asarray(patches), tokens)
            else:
                out, pooled = encoder.forward(item.images), None
            row = 0
            for slide_id, n in item.segments:
                if slide_id in slides and slides[slide_id].add(out, row, n, pooled):
                    finish(slide_id)
                row += n
        else:
            slides.pop(item.slide_id, None)
            _record_failure(out_dir, item, report)
            bar.update(1)
    for state in slides.values():  # only if the reader stopped early
        _record_failure(out_dir, Failure.kind(state.plan.spec, failures.INCOMPLETE_READ,
                                              f"{state.count} of {len(state.plan.coords)} tiles read"), report)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


class _SlideFeatures:
    """Rows of device batches that hold one slide's features, until all `len(plan.coords)` arrived."""

    def __init__(self, plan: SlidePlan):
        self.plan, self.parts, self.count = plan, [], 0

    def add(self, out: jax.Array, row: int, n: int, pooled: np.ndarray | None = None) -> bool:
        self.parts.append((out, row, n, pooled))
        self.count += n
        return self.count == len(self.plan.coords)

    def features(self, dim: int) -> np.ndarray:
        """`float32 [N, dim]` (blocks until the device has computed them)."""
        rows = [np.asarray(out)[row:row + n] for out, row, n, _ in self.parts]
        return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)

    def tokens(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Pooled patch tokens `float32 [N, S, S, D]` of the slide's tiles, in `coords` order."""
        rows = [pooled[row:row + n] for _, row, n, pooled in self.parts]
        return np.concatenate(rows) if rows else np.zeros((0, *shape), np.float32)


def _record_failure(out_dir: pathlib.Path, failure: Failure, report: Report) -> None:
    report.failures.append(failure)
    path = failures.write_failures(out_dir, report.failures)
    warnings.warn(f"{failure.slide}: {failure.error_type}: {failure.message} (recorded in {path})", stacklevel=3)
