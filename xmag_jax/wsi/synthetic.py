"""Synthetic H&E-like whole-slide images that OpenSlide opens with a physical pixel size.

`python -m xmag_jax.wsi.synthetic --out DIR --n N [--size PX] [--seed S]` writes N slides, alternating:
  * `slide_XXX.svs`: Aperio-style SVS scanned "at 40x": tiled JPEG, level-0 0.25 µm/px, levels with
    downsample 1, 4, 16, ImageDescription `Aperio Image Library ...|AppMag = 40|MPP = 0.2500`;
  * `slide_XXX.tif`: generic tiled pyramidal TIFF "at 20x": tiled JPEG, level-0 0.5 µm/px written as
    XResolution/YResolution in px per centimetre, levels with downsample 1, 4, 16;
and `DIR/labels.csv` (`slide_id,label`, slide_id = file stem). Label 0: round nuclei; label 1: twice as
many thin spindle nuclei with the same total nuclear area (see `make_scene`): clear at 20x, subtle at 5x.
Both formats cover the same physical field (`--size` px at 0.25 µm/px), rendered at 0.5 µm/px; the 40x
level 0 is that rendering upsampled 2x with a bilinear filter.

Colour follows Beer-Lambert with the Ruifrok-Johnston H&E stain vectors: eosin (pink) stroma, hematoxylin
(purple) nuclei, white glass.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np
import tifffile
from absl import flags
from PIL import Image
from scipy import ndimage

from xmag_jax import atomic, cli, errors

RENDER_MPP = 0.5
TILE_PX = 256
DOWNSAMPLES = (1, 4, 16)
HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], np.float32)
EOSIN_OD = np.array([0.07, 0.99, 0.11], np.float32)
JPEG_QUALITY = 90
DEFAULT_SIZE_PX = 8192
STAIN_MAX = 2.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """A slide's content in physical units: fields sampled every `grid_um` µm, nuclei as ellipses in µm.

    nuclei: [N, 6] float32 rows (cx, cy, semi-axis a, semi-axis b, angle rad, stain concentration).
    """

    side_um: float
    tissue: np.ndarray
    tissue_grid_um: float
    eosin: np.ndarray
    eosin_grid_um: float
    nuclei: np.ndarray


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def make_scene(side_um: float, label: int, rng: np.random.Generator) -> Scene:
    """Tissue islands (≈40–60 % of the field) whose nuclei have texture class `label`.

    Both classes scatter nuclei uniformly with the same nuclear area per mm² and the same stain, under the
    same nuisance fields (local cellularity and hematoxylin strength vary over ~100 µm). They differ in
    nuclear shape: label 0 has round nuclei 6–9 µm across; label 1 twice as many thin spindle nuclei
    (7–10 µm x 2.4–3.4 µm, randomly oriented). At 0.5 µm/px the shapes are obvious; at 2.0 µm/px a nucleus
    is 2–5 px and the classes differ only subtly, which makes the task need 20x-level knowledge.
    """
    tissue_grid = 16.0
    n = int(np.ceil(side_um / tissue_grid)) + 2
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    border = np.minimum.reduce([xx, yy, 1 - xx, 1 - yy])
    tissue = _smooth_noise(rng, n, sigma=n / 10) + 2.5 * np.clip(border * 6, 0, 1) - 1.6
    eosin_grid = 4.0
    m = int(np.ceil(side_um / eosin_grid)) + 2
    eosin = 0.32 + 0.10 * _smooth_noise(rng, m, 1.0) + 0.08 * _smooth_noise(rng, m, 12.0)

    def at(field: np.ndarray, points: np.ndarray) -> np.ndarray:
        ij = np.clip((points / tissue_grid).astype(int), 0, n - 1)
        return field[ij[:, 1], ij[:, 0]]

    area_mm2 = (side_um / 1000) ** 2
    per_mm2 = 4000 if label == 0 else 8000
    centres = rng.uniform(0, side_um, (int(per_mm2 * area_mm2), 2))
    if label == 0:
        a = rng.uniform(3.0, 4.5, len(centres))
        b = a * rng.uniform(0.8, 1.0, len(centres))
    else:
        a = rng.uniform(3.5, 5.0, len(centres))
        b = rng.uniform(1.2, 1.7, len(centres))
    angle = rng.uniform(0, np.pi, len(centres))
    cellularity = np.clip(0.6 + 0.35 * _smooth_noise(rng, n, sigma=6.0), 0.1, 1.0)
    stain_field = 1.3 + 0.3 * _smooth_noise(rng, n, sigma=6.0)
    keep = (at(tissue, centres) > 0.1) & (rng.uniform(size=len(centres)) < at(cellularity, centres))
    stain = np.clip(at(stain_field, centres) * rng.uniform(0.85, 1.15, len(centres)), 0.6, 2.0)
    nuclei = np.column_stack([centres, a, b, angle, stain])[keep].astype(np.float32)
    return Scene(side_um, tissue.astype(np.float32), tissue_grid, eosin.astype(np.float32), eosin_grid, nuclei)


def _sample(field: np.ndarray, grid_um: float, y0: int, y1: int, width: int, mpp: float) -> np.ndarray:
    """Bilinear samples [y1 - y0, width] of `field` (sample i at i * grid_um µm) at pixel centres of a grid of `mpp`."""
    s = mpp / grid_um
    box = (0.5, y0 * s + 0.5, width * s + 0.5, y1 * s + 0.5)
    return np.asarray(Image.fromarray(field, "F").resize((width, y1 - y0), Image.BILINEAR, box=box))


def render_rows(scene: Scene, y0: int, y1: int, width: int, mpp: float = RENDER_MPP) -> np.ndarray:
    """RGB uint8 [y1 - y0, width, 3] of pixel rows y0..y1 at `mpp` µm/px (pixel centres at (i + 0.5) * mpp)."""
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) * mpp
    xs = (np.arange(width, dtype=np.float32) + 0.5) * mpp
    tissue = np.clip(_sample(scene.tissue, scene.tissue_grid_um, y0, y1, width, mpp) * 4.0, 0, 1)
    eosin = tissue * np.clip(_sample(scene.eosin, scene.eosin_grid_um, y0, y1, width, mpp), 0.05, 1.0)
    hema = tissue * 0.08
    nuc = scene.nuclei
    rows = nuc[(nuc[:, 1] + nuc[:, 2] >= ys[0]) & (nuc[:, 1] - nuc[:, 2] <= ys[-1])]
    for cx, cy, a, b, angle, stain in rows:
        r = int(np.ceil(a / mpp)) + 2
        px, py = int(cx / mpp), int(cy / mpp) - y0
        x_lo, x_hi = max(px - r, 0), min(px + r + 1, width)
        y_lo, y_hi = max(py - r, 0), min(py + r + 1, y1 - y0)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        dx = xs[x_lo:x_hi][None, :] - cx
        dy = ys[y_lo:y_hi][:, None] - cy
        c, s = np.cos(angle), np.sin(angle)
        dist = np.sqrt(((dx * c + dy * s) / a) ** 2 + ((dy * c - dx * s) / b) ** 2)
        blob = stain * np.clip((1.0 - dist) * (b / mpp) * 0.8, 0, 1)
        np.maximum(hema[y_lo:y_hi, x_lo:x_hi], blob, out=hema[y_lo:y_hi, x_lo:x_hi])
    e = np.clip(eosin * (255 / STAIN_MAX), 0, 255).astype(np.uint8)
    h = np.clip(hema * (255 / STAIN_MAX), 0, 255).astype(np.uint8)
    return _stain_lut()[e, h]


@functools.cache
def _stain_lut() -> np.ndarray:
    """RGB uint8 [256, 256, 3] of (eosin, hematoxylin) concentrations quantised over [0, STAIN_MAX]."""
    c = np.linspace(0, STAIN_MAX, 256, dtype=np.float32)
    od = 0.03 + c[:, None, None] * EOSIN_OD + c[None, :, None] * HEMATOXYLIN_OD
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def _level0_strips(scene: Scene, side_px: int, scale: int) -> Iterator[np.ndarray]:
    """Level-0 RGB strips of 4 * TILE_PX rows: rendered at RENDER_MPP, upsampled `scale`x."""
    strip = 4 * TILE_PX
    render_px = side_px // scale
    for y0 in range(0, side_px, strip):
        rows = render_rows(scene, y0 // scale, min(y0 + strip, side_px) // scale, render_px)
        if scale != 1:
            rows = np.asarray(Image.fromarray(rows).resize((side_px, rows.shape[0] * scale), Image.BILINEAR))
        yield rows


def _tiles(strips: Iterator[np.ndarray], side_px: int, lower: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Level-0 tiles in TIFF order; fills the lower pyramid levels (box-filter downsamples) on the way."""
    y = 0
    for rows in strips:
        for level, ds in zip(lower, DOWNSAMPLES[1:]):
            small = Image.fromarray(rows).reduce(ds)
            level[y // ds:y // ds + small.height, :small.width] = np.asarray(small)
        padded = np.zeros((-(-rows.shape[0] // TILE_PX) * TILE_PX, -(-side_px // TILE_PX) * TILE_PX, 3), np.uint8)
        padded[:rows.shape[0], :side_px] = rows
        for ty in range(0, padded.shape[0], TILE_PX):
            for tx in range(0, padded.shape[1], TILE_PX):
                yield padded[ty:ty + TILE_PX, tx:tx + TILE_PX]
        y += rows.shape[0]


def write_slide(path: str, scene: Scene, side_px: int, level0_mpp: float, kind: str) -> None:
    """Write `scene` as a tiled JPEG pyramid; kind 'svs' (Aperio description) or 'tiff' (resolution tags)."""
    scale = int(round(RENDER_MPP / level0_mpp))
    lower = [np.zeros((side_px // ds, side_px // ds, 3), np.uint8) for ds in DOWNSAMPLES[1:]]
    with atomic.target(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for level, ds in enumerate(DOWNSAMPLES):
            shape = (side_px // ds, side_px // ds, 3)
            data = _tiles(_level0_strips(scene, side_px, scale), side_px, lower) if level == 0 else lower[level - 1]
            kwargs: dict = dict(shape=shape, dtype=np.uint8, tile=(TILE_PX, TILE_PX), photometric="rgb",
                                compression="jpeg", compressionargs={"level": JPEG_QUALITY}, metadata=None,
                                subfiletype=0 if level == 0 else 1)
            if kind == "svs":
                size = f"{side_px}x{side_px}" + ("" if level == 0 else f" -> {shape[1]}x{shape[0]}")
                kwargs["description"] = (
                    f"Aperio Image Library v12.0.15 \r\n{size} ({TILE_PX}x{TILE_PX}) JPEG/RGB Q={JPEG_QUALITY}"
                    f"|AppMag = 40|MPP = {level0_mpp:.4f}|Filename = {os.path.basename(path)}|Synthetic = 1")
            else:
                px_per_cm = 1e4 / (level0_mpp * ds)
                kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            tif.write(data, **kwargs)


def _write_one(job: tuple[str, int, int, int]) -> tuple[str, int]:
    out, i, side_px, seed = job
    label = (i // 2) % 2
    scene = make_scene(side_px * 0.25, label, np.random.default_rng([seed, i]))
    slide_id = f"slide_{i:03d}"
    if i % 2 == 0:
        write_slide(os.path.join(out, f"{slide_id}.svs"), scene, side_px, 0.25, "svs")
    else:
        write_slide(os.path.join(out, f"{slide_id}.tif"), scene, side_px // 2, 0.5, "tiff")
    return slide_id, label


def write_dataset(out: str, n: int, size_px: int = DEFAULT_SIZE_PX, seed: int = 0, workers: int = 1
                  ) -> list[tuple[str, int]]:
    """N slides (even index: 40x SVS, odd: 20x TIFF; labels 0/1 alternating in pairs) + labels.csv,
    written by `workers` processes (spawned: the caller may hold JAX or Beam threads that a fork would copy)."""
    os.makedirs(out, exist_ok=True)
    side_px = max(size_px // (TILE_PX * DOWNSAMPLES[-1]), 1) * TILE_PX * DOWNSAMPLES[-1]
    jobs = [(out, i, side_px, seed) for i in range(n)]
    if workers > 1 and n > 1:
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, n), mp_context=spawn) as pool:
            rows = list(pool.map(_write_one, jobs))
    else:
        rows = [_write_one(job) for job in jobs]
    with atomic.target(os.path.join(out, "labels.csv")) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *rows])
    return rows


PROG = "python -m xmag_jax.wsi.synthetic"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "output folder (created)", flag_values=fv)
    flags.DEFINE_integer("n", None, "number of slides", flag_values=fv)
    flags.DEFINE_integer("size", DEFAULT_SIZE_PX, f"slide side in px at 0.25 µm/px, rounded down to a multiple of "
                         f"{TILE_PX * DOWNSAMPLES[-1]} ({DEFAULT_SIZE_PX} px = {DEFAULT_SIZE_PX * 0.25 / 1000:.2f} "
                         "mm)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the scenes", flag_values=fv)
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "processes (default: all cores)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("out", "n"))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise errors.UserError(f"--out {args.out}: expected a folder (this is a file)")
    for flag, value, least in (("--n", args.n, 1), ("--size", args.size, TILE_PX * DOWNSAMPLES[-1]),
                               ("--workers", args.workers, 1)):
        if value < least:
            raise errors.UserError(f"{flag} {value}: expected an integer >= {least}")
    rows = write_dataset(args.out, args.n, args.size, args.seed, args.workers)
    print(f"wrote {len(rows)} slides and labels.csv to {args.out}")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
