r"""Synthetic survival cohorts where the spatial arrangement of two tissue classes decides the risk (or only amounts).

    python -m data_prep.synthetic_survival features --out DIR --n 100 [--cohort spatial|amount] [--tokens S]
    python -m data_prep.synthetic_survival slides --out DIR --n 8 [--cohort spatial|amount]

Each slide is a grid of tiles (`--min_side`..`--max_side` tiles a side, ~5 % missing) with a map of two texture
classes at word resolution (S x S words per tile; S = 1: one class per tile):
  * `spatial` cohort: class 1 covers exactly half the map in every slide; the maps differ in grain (a thresholded
    smooth random field of width 0.6-3 tiles), so the length of the class interface varies while the amounts do
    not. Risk = the standardised interface length (fraction of 4-neighbour word pairs of different class).
  * `amount` cohort (control): the grain varies the same way but risk = the standardised class-1 fraction (20-80 %).
Times are exponential with hazard `exp(beta * risk) / 50` per month, censored uniformly in 12-120 months;
covariates `age` (noise) and `stage` (1-3, the risk plus noise) go into `clinical.csv` (slide_id,time,event,age,stage).

Two writers:
  * `features` (the CI shortcut, no image): TRIDENT-layout `DIR/features/{slide_id}.h5` directly, as
    `xmag_jax.embed` would write them for a 5x encoder: `coords` on a grid of `patch_size_level0` px,
    `features` = the mean of the tile's word-class prototypes + Gaussian noise, attrs `mpp` 2.0 µm/px,
    `patch_size` 224, `patch_size_level0` 896 (level 0 at 0.5 µm/px), `encoder`; with `--tokens S` also the
    `tokens [N, S, S, D]` dataset (word prototypes + noise, `xmag_jax.formats.feature_h5`).
  * `slides` (the real path, slow): pyramidal TIFFs rendered by `xmag_jax.wsi.synthetic` (its class-0 round and class-1
    spindle nuclei, chosen per word cell by the class map) for `xmag_jax.embed`; the tissue there is
    `xmag_jax.wsi.synthetic`'s own islands, so tiles outside them are dropped by tiling.
Both also write `DIR/clinical.csv` and `DIR/class_maps.npz` (one bool map per slide).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import pathlib

import numpy as np
from absl import flags
from scipy import ndimage

from xmag_jax import atomic, cli, errors, geometry
from xmag_jax.formats import feature_h5

COHORTS = ("spatial", "amount")
MPP = geometry.MPP_5X  # µm/px of the 5x features
PATCH_PX = geometry.TILE_PX
LEVEL0_MPP = geometry.MPP_20X  # the synthetic slides are 20x scans
BETA = 1.2  # log hazard ratio per standard deviation of the risk driver
BASE_MONTHS = 50.0  # mean time to recurrence at risk 0


@dataclasses.dataclass(frozen=True)
class SyntheticSlide:
    """`classes bool [H*S, W*S]` at word resolution, `tissue bool [H, W]` tiles present, the raw risk driver."""

    slide_id: str
    classes: np.ndarray
    tissue: np.ndarray
    driver: float


def class_map(shape: tuple[int, int], grain: float, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A bool map whose True cells are exactly round(`fraction` x cells): a smooth random field of width `grain`
    cells, thresholded at its quantile."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), grain, mode="reflect")
    k = int(round(fraction * field.size))
    out = np.zeros(field.size, bool)
    out[np.argsort(field, axis=None)[field.size - k:]] = True
    return out.reshape(shape)


def interface(classes: np.ndarray) -> float:
    """Fraction of horizontally or vertically adjacent cell pairs of different class."""
    pairs = classes[1:, :].size + classes[:, 1:].size
    return float(((classes[1:, :] != classes[:-1, :]).sum() + (classes[:, 1:] != classes[:, :-1]).sum()) / pairs)


def make_cohort(n: int, cohort: str, *, seed: int = 0, words: int = 1, min_side: int = 8, max_side: int = 12
                ) -> tuple[list[SyntheticSlide], list[dict]]:
    """`n` slides and their clinical rows (`slide_id, time, event, age, stage`) for `cohort` in `COHORTS`."""
    if cohort not in COHORTS:
        raise ValueError(f"cohort {cohort!r}; expected one of {COHORTS}")
    rng = np.random.default_rng([seed, COHORTS.index(cohort)])
    slides = []
    for i in range(n):
        h, w = rng.integers(min_side, max_side + 1, 2)
        grain = float(np.exp(rng.uniform(np.log(0.6), np.log(3.0)))) * words
        fraction = 0.5 if cohort == "spatial" else float(rng.uniform(0.2, 0.8))
        classes = class_map((h * words, w * words), grain, fraction, rng)
        tissue = rng.uniform(size=(h, w)) > 0.05
        driver = interface(classes) if cohort == "spatial" else fraction
        slides.append(SyntheticSlide(f"slide_{i:03d}", classes, tissue, driver))
    drivers = np.array([s.driver for s in slides])
    risk = (drivers - drivers.mean()) / (drivers.std() + 1e-9)
    t_event = rng.exponential(BASE_MONTHS * np.exp(-BETA * risk))
    t_censor = rng.uniform(12.0, 120.0, n)
    stage = np.clip(np.round(2 + 0.7 * risk + 0.7 * rng.standard_normal(n)), 1, 3)
    rows = [{"slide_id": s.slide_id, "time": round(float(min(te, tc)), 2), "event": int(te <= tc),
             "age": round(float(rng.normal(65, 10)), 1), "stage": int(st)}
            for s, te, tc, st in zip(slides, t_event, t_censor, stage)]
    return slides, rows


def write_clinical(out: pathlib.Path, rows: list[dict], slides: list[SyntheticSlide]) -> None:
    with atomic.target(out / "clinical.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic.target(out / "class_maps.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{s.slide_id: s.classes for s in slides})


def write_features(out: str | os.PathLike, slides: list[SyntheticSlide], *, dim: int = 16, noise: float = 0.5,
                   words: int = 1, tokens: bool = False, seed: int = 0) -> None:
    """TRIDENT-layout `out/{slide_id}.h5` for `slides` (word-resolution maps with `words` x `words` per tile).

    Word vector = class prototype (two fixed random unit vectors x 2) + N(0, noise²) per dim; tile `features`
    = mean of its words + N(0, noise²/ words²); `tokens [N, S, S, dim]` (S = `words`) when `tokens`.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    prototypes = rng.standard_normal((2, dim))
    prototypes *= 2.0 / np.linalg.norm(prototypes, axis=1, keepdims=True)
    stride = int(round(PATCH_PX * MPP / LEVEL0_MPP))
    for slide in slides:
        h, w = slide.tissue.shape
        rows, cols = np.nonzero(slide.tissue)
        origin = rng.integers(0, 40, 2) * stride
        coords = np.stack([cols * stride + origin[0], rows * stride + origin[1]], axis=1).astype(np.int64)
        cls = slide.classes.reshape(h, words, w, words).transpose(0, 2, 1, 3)[rows, cols]  # [N, S, S]
        word_vecs = prototypes[cls.astype(int)] + noise * rng.standard_normal((*cls.shape, dim))
        feats = word_vecs.mean(axis=(1, 2)) + noise / words * rng.standard_normal((len(rows), dim))
        attrs = {"patch_size": PATCH_PX, "patch_size_level0": stride, "mpp": MPP, "level0_mpp": LEVEL0_MPP,
                 "target_magnification": 5.0, "level0_magnification": 20.0, "encoder": "synthetic:class-prototypes",
                 "embed_dim": dim, "name": slide.slide_id}
        feature_h5.write(out / f"{slide.slide_id}.h5", feats, coords, attrs,
                         tokens=word_vecs if tokens else None, patch_grid=words)


def write_slides(out: str | os.PathLike, slides: list[SyntheticSlide], *, words: int = 1, seed: int = 0) -> None:
    """Pyramidal TIFFs `out/{slide_id}.tif` (level 0 at 0.5 µm/px) rendered by `xmag_jax.wsi.synthetic`: nuclei of
    class 0 (round) or 1 (spindle) where the class map says so; one map cell = 448 / `words` µm."""
    from xmag_jax.wsi import synthetic

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cell_um = PATCH_PX * MPP / words
    for i, slide in enumerate(slides):
        side_cells = max(slide.classes.shape)
        classes = np.zeros((side_cells, side_cells), bool)
        classes[: slide.classes.shape[0], : slide.classes.shape[1]] = slide.classes
        side_um = side_cells * cell_um
        rng = np.random.default_rng([seed, i])
        scenes = [synthetic.make_scene(side_um, label, rng) for label in (0, 1)]
        keep = []
        for label, scene in enumerate(scenes):
            cell = np.clip((scene.nuclei[:, :2] / cell_um).astype(int), 0, side_cells - 1)
            keep.append(scene.nuclei[classes[cell[:, 1], cell[:, 0]] == bool(label)])
        scene = dataclasses.replace(scenes[0], nuclei=np.concatenate(keep))
        side_px = int(side_um / LEVEL0_MPP) // 16 * 16
        synthetic.write_slide(str(out / f"{slide.slide_id}.tif"), scene, side_px, LEVEL0_MPP, "tiff")


PROG = "python -m data_prep.synthetic_survival"


def _define(fv: flags.FlagValues, writer: str) -> None:
    flags.DEFINE_string("out", None, f"output folder: clinical.csv, class_maps.npz, {writer}/", flag_values=fv)
    flags.DEFINE_integer("n", 100, "slides", flag_values=fv)
    flags.DEFINE_enum("cohort", "spatial", list(COHORTS), "what decides the risk: the class interface or amount",
                      flag_values=fv)
    flags.DEFINE_integer("tokens", 0, "S: class map at S x S words per tile"
                         + (", and the h5 'tokens' dataset" if writer == "features" else "")
                         + "; 0 = one class per tile" + (", no tokens" if writer == "features" else ""),
                         flag_values=fv)
    if writer == "features":
        flags.DEFINE_integer("dim", 16, "feature dim", flag_values=fv)
        flags.DEFINE_float("noise", 0.5, "feature noise std", flag_values=fv)
    flags.DEFINE_integer("min_side", 8, "tiles per slide side, at least", flag_values=fv)
    flags.DEFINE_integer("max_side", 12, "tiles per slide side, at most", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the maps, times and features", flag_values=fv)


COMMANDS = {writer: cli.Command(f"{PROG} {writer}", functools.partial(_define, writer=writer), doc=doc,
                                required=("out",))
            for writer, doc in (("features", "h5 features (the CI shortcut, no image)"),
                                ("slides", "rendered pyramidal TIFF slides (the real path, slow)"))}


def _run(writer: str, argv: list[str]) -> int:
    args, _ = COMMANDS[writer].parse(argv)
    words = max(args.tokens, 1)
    slides, rows = make_cohort(args.n, args.cohort, seed=args.seed, words=words, min_side=args.min_side,
                               max_side=args.max_side)
    out = pathlib.Path(args.out)
    if writer == "features":
        write_features(out / "features", slides, dim=args.dim, noise=args.noise, words=words, tokens=args.tokens > 0,
                       seed=args.seed)
    else:
        write_slides(out / "slides", slides, words=words, seed=args.seed)
    write_clinical(out, rows, slides)
    events = sum(r["event"] for r in rows)
    print(f"wrote {len(rows)} {args.cohort} slides ({events} events) to {out}/{writer}, clinical.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(PROG, {w: functools.partial(_run, w) for w in COMMANDS}, argv, doc=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
