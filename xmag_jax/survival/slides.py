"""Slides as the survival models see them: tile words, tile embeddings, µm positions and grid neighbours.

Reads TRIDENT-layout feature h5 files (`xmag_jax.formats.feature_h5`) plus, when present, the `tokens`
dataset (`xmag_jax.formats.feature_h5`). All slides of a run must share the encoder (`encoder` attr), the pixel
size (`mpp`, µm/px) and the tile size (`patch_size`, px); mixed files are refused, naming them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from xmag_jax.errors import UserError
from xmag_jax.formats import feature_h5

# Offsets (dx, dy) in tiles of a tile's 3 x 3 neighbourhood, the tile itself first.
NEIGHBOUR_OFFSETS = np.array([(0, 0), (-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)], np.int64)


class SlideDataError(UserError):
    """Feature files missing, unreadable or inconsistent (names the files)."""


@dataclasses.dataclass(frozen=True)
class Slide:
    """One slide: `features [N, D]`, `words [N, W, Dw]` (W = S*S token words, or 1 = the tile embedding),
    `centres_um [N, 2]` tile centres in level-0 µm, `neighbours [N, 9]` row indices of the 3 x 3 neighbourhood
    (`NEIGHBOUR_OFFSETS` order, -1 where no tile)."""

    slide_id: str
    features: np.ndarray
    words: np.ndarray
    centres_um: np.ndarray
    neighbours: np.ndarray

    @property
    def n_tiles(self) -> int:
        return len(self.features)


def grid_neighbours(coords: np.ndarray, stride: float) -> np.ndarray:
    """`[N, 9]` indices of each tile's neighbours on the grid of `stride` level-0 px (`coords [N, 2]` px),
    -1 if none."""
    cells = np.round(np.asarray(coords, np.float64) / stride).astype(np.int64)
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(cells)}
    out = np.full((len(cells), len(NEIGHBOUR_OFFSETS)), -1, np.int64)
    for i, (x, y) in enumerate(cells):
        for j, (dx, dy) in enumerate(NEIGHBOUR_OFFSETS):
            out[i, j] = index.get((int(x + dx), int(y + dy)), -1)
    return out


def _read_words(path: pathlib.Path, n: int) -> tuple[np.ndarray | None, dict]:
    try:
        words, attrs = feature_h5.read_tokens(path, n)
    except feature_h5.FeatureFileError as e:
        raise SlideDataError(str(e)) from e
    return (None if words is None else words.reshape(n, -1, words.shape[-1])), attrs


def load_slides(directory: str | pathlib.Path, slide_ids: Sequence[str], *, use_tokens: bool = True
                ) -> tuple[list[Slide], list[str]]:
    """The slides `slide_ids` (in that order) from `DIR/{slide_id}.h5`, checked to agree with each other, and the
    ids of slides left out because they have no tile (no tissue). A slide with one tile is kept.

    Raises `SlideDataError` listing slides without a feature file, or naming the files whose encoder, µm/px,
    tile size, feature dim or presence of `tokens` differ from the first file's. Words are the `tokens` when
    every file has them and `use_tokens`, else each tile's embedding (one word per tile).
    """
    try:
        files = feature_h5.list_files(directory)
    except FileNotFoundError as e:
        raise SlideDataError(str(e)) from e
    missing = [s for s in slide_ids if s not in files]
    if missing:
        raise SlideDataError(
            f"{len(missing)} slide(s) of the clinical CSV have no feature file in {directory}: {missing}")
    raw = []
    for slide_id in slide_ids:
        try:
            bag = feature_h5.read(files[slide_id])
        except feature_h5.FeatureFileError as e:
            raise SlideDataError(str(e)) from e
        words, word_attrs = _read_words(bag.path, len(bag.features)) if use_tokens else (None, {})
        raw.append((bag, words, word_attrs))
    first = raw[0][0]
    keys = {"encoder": lambda b, w, a: b.attrs.get("encoder"), "mpp (µm/px)": lambda b, w, a: b.attrs.get("mpp"),
            "patch_size (px)": lambda b, w, a: b.attrs.get("patch_size"),
            "feature dim": lambda b, w, a: b.features.shape[1], "tokens": lambda b, w, a: w is not None,
            "token_grid": lambda b, w, a: a.get("token_grid")}
    for name, get in keys.items():
        ref = get(*raw[0])
        odd = [str(b.path) for b, w, a in raw if get(b, w, a) != ref]
        if odd:
            raise SlideDataError(f"feature files disagree on {name}: {first.path} has {ref!r} but {odd} differ; "
                                 "use files from one encoder at one pixel size")
    for attr in ("mpp", "patch_size_level0"):
        if attr not in first.attrs:
            raise SlideDataError(f"{first.path}: no '{attr}' attribute; the spatial model needs tile positions in µm")
    slides, empty = [], []
    for bag, words, _ in raw:
        if len(bag.features) == 0:
            empty.append(bag.slide_id)
            continue
        mpp0 = float(bag.attrs["mpp"]) * float(bag.attrs["patch_size"]) / float(bag.attrs["patch_size_level0"])
        stride = float(bag.attrs["patch_size_level0"])
        centres = (bag.coords.astype(np.float64) + stride / 2) * mpp0
        slides.append(Slide(bag.slide_id, bag.features,
                            words if words is not None else bag.features[:, None, :],
                            centres.astype(np.float32), grid_neighbours(bag.coords, stride)))
    return slides, empty
