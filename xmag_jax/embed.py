"""Slide embeddings: tissue tiles at a target µm/px through a ViT, one TRIDENT-layout h5 per slide.

    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --checkpoint ckpt/student           # student, 5x
    python -m xmag_jax.embed --slides DIR_OR_CSV --out DIR --model uni2_h --weights W --mpp 0.5  # teacher, 20x

Per slide: CLAM-style tissue mask and a grid of non-overlapping `--patch-px` tiles at `--mpp` µm/px
(`data_prep.tissue`), tiles read from the best pyramid level (`data_prep.slide_reader`) by background
threads into a bounded queue while the device computes, a jitted forward on fixed-shape batches (the
last one zero-padded: one compile), sharded over the local devices along the batch.

Output `OUT/{slide_id}.h5`: `features [N, D]` float32 and `coords [N, 2]` int64 level-0 top-left (x, y),
with attrs (on the file and on `coords`, as TRIDENT) `patch_size` (px at the target), `patch_size_level0`,
`mpp`, `target_magnification`, `level0_mpp`, `level0_magnification`, `encoder`, `name`. Files are
written under a temp name and renamed; slides whose h5 exists with the same encoder and µm/px are
skipped (resume); a slide that fails is recorded in `OUT/failures.jsonl` and the job goes on; a slide
without tissue gets an empty h5 (N = 0) and a warning.
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
import threading
import time
import traceback
import warnings
from collections.abc import Iterator

import h5py
import jax
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_prep import inputs, slide_reader, tissue
from xmag_jax import models
from xmag_jax.models import checkpoint

FAILURES_FILE = "failures.jsonl"


@dataclasses.dataclass
class Encoder:
    """A ViT and the embedding users take; `forward(uint8 [B, H, W, 3]) -> float32 [B, E]` is jitted and
    data-parallel over the local devices (B must divide by `len(jax.local_devices())`)."""

    name: str
    arch: models.Arch
    model: models.VisionTransformer

    def __post_init__(self):
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(self.model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        arch = self.arch

        def forward(state, images, with_tokens):
            out = nnx.merge(graphdef, state)(models.normalize(arch, images))
            emb = models.embed(arch, out).astype(np.float32)
            return (emb, out.patches.astype(np.float32)) if with_tokens else emb

        self._forward = jax.jit(forward, static_argnums=2)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def forward(self, images: np.ndarray) -> jax.Array:
        """`uint8 [B, H, W, 3]` -> embedding `float32 [B, E]` (a device array; dispatch is asynchronous)."""
        return self._forward(self._state, jax.device_put(images, self._batch_sharding), False)

    def forward_with_tokens(self, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """`uint8 [B, H, W, 3]` -> (embedding `[B, E]`, patch tokens `[B, H/p, W/p, D]`), float32."""
        return self._forward(self._state, jax.device_put(images, self._batch_sharding), True)


def load_encoder(*, checkpoint_dir: str | None = None, timm_dir: str | None = None, model: str | None = None,
                 weights: str | None = None, random_init: bool = False, seed: int = 0,
                 dtype: str | None = None, **vit_overrides) -> Encoder:
    """An encoder from exactly one source: a model checkpoint dir (`models.checkpoint`), a timm local dir
    exported by `xmag_jax.convert export` (`config.json` + `model.safetensors`), or a registry name with
    a weights file (timm `.safetensors`/`.bin` state dict, or a model checkpoint dir) or `random_init`.
    `dtype` sets the compute dtype (e.g. 'bfloat16'); `vit_overrides` other ViTConfig fields (e.g. depth)."""
    sources = [s for s in (checkpoint_dir, timm_dir, model) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of --checkpoint, --timm-dir, --model")
    overrides = dict(vit_overrides, **({"dtype": dtype} if dtype else {}))
    if checkpoint_dir:
        net, arch = checkpoint.load_model(checkpoint_dir, dtype=dtype)
        return Encoder(f"{arch.name}:{os.path.abspath(checkpoint_dir)}", arch, net)
    if timm_dir:
        arch = _arch_of_timm_dir(pathlib.Path(timm_dir), overrides)
        net = _from_timm_weights(arch, pathlib.Path(timm_dir) / "model.safetensors")
        return Encoder(f"{arch.name}:{os.path.abspath(timm_dir)}", arch, net)
    if weights and random_init:
        raise ValueError("--weights and --random-init exclude each other")
    if weights:
        if os.path.isdir(weights):
            net, arch = checkpoint.load_model(weights, dtype=dtype)
            if arch.name != model:
                raise ValueError(f"{weights}: checkpoint holds {arch.name!r}, not --model {model!r}")
        else:
            arch = models.get_arch(model, **overrides)
            net = _from_timm_weights(arch, pathlib.Path(weights))
        return Encoder(f"{model}:{os.path.abspath(weights)}", arch, net)
    if not random_init:
        raise ValueError(f"--model {model} needs --weights FILE (or --random-init for a random-init baseline)")
    arch = models.get_arch(model, **overrides)
    return Encoder(f"{model}:random-init-seed{seed}", arch, models.create_model(model, rngs=nnx.Rngs(seed), **overrides))


def _from_timm_weights(arch: models.Arch, path: pathlib.Path) -> models.VisionTransformer:
    from xmag_jax.convert import timm_io

    return timm_io.flax_from_state_dict(arch, timm_io.read_state_dict(path), source=str(path))


def _arch_of_timm_dir(directory: pathlib.Path, overrides: dict) -> models.Arch:
    """The registry entry named in `config.json`'s `xmag_jax.arch`, with the sizes of its `model_args`."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist (expected a timm local dir: config.json + model.safetensors)")
    config = json.loads(config_file.read_text())
    name = config.get("xmag_jax", {}).get("arch")
    if not name:
        raise ValueError(f"{config_file}: no 'xmag_jax.arch' entry (not written by `xmag_jax.convert export`); "
                         "use --model NAME --weights DIR/model.safetensors")
    fields = {f.name for f in dataclasses.fields(models.ViTConfig)}
    sizes = {k: v for k, v in config.get("model_args", {}).items() if k in fields}
    return models.get_arch(name, **{**sizes, **overrides})


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
    plan: SlidePlan
    images: np.ndarray  # uint8 [B, patch_px, patch_px, 3], zero rows after n_valid
    n_valid: int


@dataclasses.dataclass
class Failure:
    spec: inputs.SlideSpec
    error: BaseException


class _End:
    """Sentinel after the last item."""


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
                 prefetch: int = 4) -> Iterator[SlidePlan | Batch | Failure]:
    """For each slide in order: its `SlidePlan`, its tiles as fixed-shape `Batch`es, or a `Failure`.

    A background thread opens the slides and plans them; `workers` threads read tiles (each with its own
    slide handle) ahead of the consumer; at most `prefetch` batches wait in the queue.
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
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="embed-read") as pool:
            for spec in specs:
                if stop.is_set():
                    break
                handles: list[slide_reader.Slide] = []
                try:
                    handles.append(slide_reader.open_slide(spec.path, spec.mpp, spec.slide_id))
                    plan = plan_slide(handles[0], spec, tiling)
                    handles += [slide_reader.open_slide(spec.path, spec.mpp, spec.slide_id)
                                for _ in range(min(workers, len(plan.coords)) - 1)]
                    put(plan)
                    for b in _slide_batches(pool, handles, plan, tiling, batch, stop):
                        put(b)
                except Exception as e:  # a bad slide is reported and skipped; the job goes on
                    put(Failure(spec, e))
                finally:
                    for h in handles:
                        h.close()
        put(_End())

    thread = threading.Thread(target=produce, name="embed-plan", daemon=True)
    thread.start()
    try:
        while not isinstance(item := out.get(), _End):
            yield item
    finally:
        stop.set()
        thread.join()


def _slide_batches(pool, handles, plan: SlidePlan, tiling: Tiling, batch: int,
                   stop: threading.Event) -> Iterator[Batch]:
    free: queue.Queue = queue.Queue()
    for h in handles:
        free.put(h)

    def read(xy: np.ndarray) -> np.ndarray:
        handle = free.get()
        try:
            return slide_reader.read_field(handle, int(xy[0]), int(xy[1]), plan.field_level0, tiling.patch_px)
        finally:
            free.put(handle)

    window = collections.deque()
    coords = iter(plan.coords)
    for xy in coords:  # keep about two batches of reads in flight
        window.append(pool.submit(read, xy))
        if len(window) >= 2 * batch:
            break
    images = np.zeros((batch, tiling.patch_px, tiling.patch_px, 3), np.uint8)
    n = 0
    try:
        while window and not stop.is_set():
            images[n] = window.popleft().result()
            n += 1
            if (xy := next(coords, None)) is not None:
                window.append(pool.submit(read, xy))
            if n == batch:
                yield Batch(plan, images, n)
                images, n = np.zeros_like(images), 0  # a fresh buffer: the last one may back a device array
        if n:
            yield Batch(plan, images, n)
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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(features, np.float32))
            c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
            for k, v in attrs.items():
                f.attrs[k] = v
                c.attrs[k] = v
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_done(path: pathlib.Path, encoder_name: str, tiling: Tiling) -> bool:
    """True if `path` is a complete h5 from the same encoder and tiling; an h5 from another one is an error."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            made_by = (f.attrs.get("encoder"), float(f.attrs.get("mpp", -1)), int(f.attrs.get("patch_size", -1)))
    except OSError:
        return False  # unreadable: redo it
    if made_by != (encoder_name, tiling.mpp, tiling.patch_px):
        raise FileExistsError(f"{path} was made by encoder {made_by[0]!r} at {made_by[1]} µm/px, {made_by[2]} px; "
                              f"this run is {encoder_name!r} at {tiling.mpp} µm/px, {tiling.patch_px} px: "
                              "use another --out")
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


def embed_slides(specs: list[inputs.SlideSpec], encoder: Encoder, out_dir: str | os.PathLike, tiling: Tiling, *,
                 batch: int = 64, workers: int = 4, prefetch: int = 4, progress: bool = True) -> Report:
    """Embed every slide not already done into `out_dir`; failures go to `out_dir/failures.jsonl`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_dev = len(jax.local_devices())
    batch = -(-batch // n_dev) * n_dev
    report = Report()
    todo = []
    for spec in specs:
        if is_done(out_dir / f"{spec.slide_id}.h5", encoder.name, tiling):
            report.skipped.append(spec.slide_id)
        else:
            todo.append(spec)
    if not todo:
        return report
    t0 = time.perf_counter()
    jax.block_until_ready(encoder.forward(np.zeros((batch, tiling.patch_px, tiling.patch_px, 3), np.uint8)))
    report.compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=len(todo), unit="slide", disable=not progress, desc=f"embed @{tiling.mpp:g}µm/px")
    current: SlidePlan | None = None
    pending: list[tuple[jax.Array, int]] = []

    def finish(plan: SlidePlan) -> None:
        feats = np.concatenate([np.asarray(f)[:n] for f, n in pending], 0) if pending else np.zeros((0, encoder.embed_dim), np.float32)
        if len(feats) != len(plan.coords):
            raise RuntimeError(f"{plan.spec.path}: {len(feats)} features for {len(plan.coords)} tiles")
        write_h5(out_dir / f"{plan.spec.slide_id}.h5", feats, plan.coords,
                 h5_attrs(plan, tiling, encoder.name, encoder.embed_dim))
        report.done.append(plan.spec.slide_id)
        report.tiles[plan.spec.slide_id] = len(feats)
        if not len(feats):
            report.empty.append(plan.spec.slide_id)
            warnings.warn(f"{plan.spec.path}: no tissue tiles at {tiling.mpp:g} µm/px; wrote an empty h5", stacklevel=3)

    def close_current() -> None:
        nonlocal current
        if current is not None:
            try:
                finish(current)
            except Exception as e:
                _record_failure(out_dir, current.spec, e, report)
            current = None
            pending.clear()
            bar.set_postfix(tiles=sum(report.tiles.values()), failed=len(report.failed), refresh=False)
            bar.update(1)

    for item in read_batches(todo, tiling, batch, workers=workers, prefetch=prefetch):
        if isinstance(item, SlidePlan):
            close_current()
            current = item
        elif isinstance(item, Batch):
            pending.append((encoder.forward(item.images), item.n_valid))
        else:
            if current is not None and current.spec.slide_id == item.spec.slide_id:
                current, pending[:] = None, []
            _record_failure(out_dir, item.spec, item.error, report)
            bar.update(1)
    close_current()
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _record_failure(out_dir: pathlib.Path, spec: inputs.SlideSpec, error: BaseException, report: Report) -> None:
    report.failed.append(spec.slide_id)
    entry = {"slide_id": spec.slide_id, "path": spec.path, "error": type(error).__name__, "message": str(error),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "traceback": "".join(traceback.format_exception(error))[-2000:]}
    with open(out_dir / FAILURES_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    warnings.warn(f"{spec.path}: {type(error).__name__}: {error} (recorded in {out_dir / FAILURES_FILE})", stacklevel=3)


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint directory (models.checkpoint / trainer export)")
    src.add_argument("--timm-dir", help="timm local dir: config.json + model.safetensors")
    src.add_argument("--model", help="registry name (with --weights FILE, or --random-init)")
    p.add_argument("--weights", help="weights for --model: timm safetensors state dict or model checkpoint dir")
    p.add_argument("--random-init", action="store_true", help="random-init --model (a baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the model's)")


def encoder_from_args(args: argparse.Namespace) -> Encoder:
    return load_encoder(checkpoint_dir=args.checkpoint, timm_dir=args.timm_dir, model=args.model,
                        weights=args.weights, random_init=args.random_init, seed=args.seed, dtype=args.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xmag_jax.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", required=True, help="folder of slides, or CSV manifest (path[,slide_id,mpp])")
    p.add_argument("--out", required=True, help="output folder of {slide_id}.h5")
    add_encoder_args(p)
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px (2.0 ≈ 5x, 0.5 ≈ 20x)")
    p.add_argument("--patch-px", type=int, default=224, help="tile side in px at --mpp")
    p.add_argument("--tissue-threshold", type=float, default=0.25, help="min tissue fraction of a kept tile")
    p.add_argument("--batch", type=int, default=64, help="tiles per forward (rounded up to a multiple of devices)")
    p.add_argument("--workers", type=int, default=4, help="tile reader threads")
    p.add_argument("--prefetch", type=int, default=4, help="batches read ahead")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    specs = inputs.list_slides(args.slides)
    encoder = encoder_from_args(args)
    tiling = Tiling(args.mpp, args.patch_px, args.tissue_threshold)
    report = embed_slides(specs, encoder, args.out, tiling, batch=args.batch, workers=args.workers,
                          prefetch=args.prefetch, progress=not args.no_progress)
    n_tiles = sum(report.tiles.values())
    print(f"{encoder.name} @ {args.mpp:g} µm/px -> {args.out}: {len(report.done)} embedded ({n_tiles} tiles, "
          f"{len(report.empty)} empty), {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s (+{report.compile_seconds:.1f}s compile)")
    if report.failed:
        print(f"failures: {report.failed} (see {os.path.join(args.out, FAILURES_FILE)})")
    return 1 if report.failed and not report.done and not report.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
