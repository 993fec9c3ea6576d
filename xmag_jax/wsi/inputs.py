"""What to tile: slides from a folder or a CSV manifest, optional patch-coordinate h5 files, the split of each slide.

CSV manifest columns: `path` (required; relative to the CSV's folder), optional `slide_id` (default: file
stem), `mpp` (level-0 µm/px, overrides the file), `split` (e.g. train/val/test), `coords` (TRIDENT/CLAM h5).
Any other column is refused (a misspelled `split` would otherwise be silently ignored). The file is read as
UTF-8 with or without a byte-order mark (Excel writes one).

Slide ids name files (`work/{slide_id}.array_record`, `overlays/{slide_id}.png`) and are the key that labels
and embeddings are joined on, so an id that is not a safe file name is refused rather than renamed: one
path component, printable, no leading `.`, at most 200 characters.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re

import h5py
import numpy as np

from xmag_jax.errors import UserError
from xmag_jax.wsi import slide_reader

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
CSV_COLUMNS = ("path", "slide_id", "mpp", "split", "coords")
MAX_SLIDE_ID = 200


class ManifestError(UserError, ValueError):
    """The slide list itself is wrong (bad CSV, duplicate slide ids): nothing is processed."""


class CoordsError(slide_reader.SlideError):
    """A patch-coordinate h5 file is missing or does not follow the TRIDENT/CLAM layout."""


@dataclasses.dataclass(frozen=True)
class SlideSpec:
    """One slide to tile. mpp: level-0 µm/px given by the user (None: read from the file)."""

    path: str
    slide_id: str
    mpp: float | None = None
    split: str | None = None
    coords: str | None = None


def check_slide_id(slide_id: str, where: str) -> str:
    """`slide_id` if it is a safe file name (see the module doc), else ManifestError naming `where`."""
    problem = ("is empty" if not slide_id else
               f"is longer than {MAX_SLIDE_ID} characters" if len(slide_id) > MAX_SLIDE_ID else
               "has a path separator" if "/" in slide_id or "\\" in slide_id else
               "starts with '.'" if slide_id.startswith(".") else
               "has a non-printable character" if not slide_id.isprintable() else None)
    if problem:
        raise ManifestError(f"{where}: slide id {slide_id!r} {problem}; slide ids must be one file-name component "
                            f"(printable, no '/', no leading '.', at most {MAX_SLIDE_ID} characters)")
    return slide_id


def _from_folder(folder: str) -> list[SlideSpec]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(SLIDE_EXTENSIONS))
    if not names:
        raise ManifestError(f"{folder}: no slide files ({' '.join(SLIDE_EXTENSIONS)})")
    return [SlideSpec(os.path.join(folder, n), check_slide_id(slide_reader.slide_id_of(n), os.path.join(folder, n)))
            for n in names]


def _from_csv(path: str) -> list[SlideSpec]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ManifestError(f"{path}: CSV manifest needs a `path` column (optional: slide_id, mpp, split, "
                                f"coords); found columns {reader.fieldnames}")
        unknown = [c for c in reader.fieldnames if c not in CSV_COLUMNS]
        if unknown:
            raise ManifestError(f"{path}: unknown column(s) {unknown}; the manifest columns are {list(CSV_COLUMNS)}")
        specs = []
        for line, row in enumerate(reader, start=2):
            slide_path = (row.get("path") or "").strip()
            if not slide_path:
                raise ManifestError(f"{path}:{line}: empty `path`")
            mpp_text = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                raise ManifestError(
                    f"{path}:{line}: `mpp` must be the level-0 µm/px (e.g. 0.25), got {mpp_text!r}") from None
            if mpp is not None and not slide_reader.PLAUSIBLE_MPP[0] <= mpp <= slide_reader.PLAUSIBLE_MPP[1]:
                raise ManifestError(f"{path}:{line}: `mpp` {mpp} µm/px is outside {slide_reader.PLAUSIBLE_MPP}")
            split = (row.get("split") or "").strip() or None
            if split is not None and not SPLIT_NAME.match(split):
                raise ManifestError(f"{path}:{line}: `split` {split!r} must be lowercase letters, digits, _")
            coords = (row.get("coords") or "").strip() or None
            slide_path = os.path.join(base, slide_path)
            slide_id = (row.get("slide_id") or "").strip() or slide_reader.slide_id_of(slide_path)
            specs.append(SlideSpec(slide_path, check_slide_id(slide_id, f"{path}:{line}"), mpp, split,
                                   os.path.join(base, coords) if coords else None))
    if not specs:
        raise ManifestError(f"{path}: CSV manifest lists no slides")
    return specs


def _with_coords_dir(spec: SlideSpec, coords_dir: str) -> SlideSpec:
    if spec.coords:
        return spec
    for name in (f"{spec.slide_id}.h5", f"{spec.slide_id}_patches.h5", os.path.join("patches", f"{spec.slide_id}.h5")):
        candidate = os.path.join(coords_dir, name)
        if os.path.isfile(candidate):
            return dataclasses.replace(spec, coords=candidate)
    return dataclasses.replace(spec, coords=os.path.join(coords_dir, f"{spec.slide_id}.h5"))


def list_slides(slides: str, coords_dir: str | None = None) -> list[SlideSpec]:
    """Slides from a folder or a CSV manifest; with `coords_dir`, each slide's `{slide_id}[_patches].h5`."""
    if os.path.isdir(slides):
        specs = _from_folder(slides)
    elif os.path.isfile(slides):
        specs = _from_csv(slides)
    else:
        raise ManifestError(f"{slides}: neither a folder of slides nor a CSV manifest")
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.slide_id in seen:
            raise ManifestError(f"slide id {spec.slide_id!r} is used by both {seen[spec.slide_id]} and {spec.path}; "
                                f"give them distinct `slide_id`s in a CSV manifest")
        seen[spec.slide_id] = spec.path
    if coords_dir:
        specs = [_with_coords_dir(s, coords_dir) for s in specs]
    return specs


def assign_splits(specs: list[SlideSpec], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """slide_id -> split. CSV `split` wins; the others go to 'val' by a seeded hash order
    (round(val_fraction * n) slides, at least one when val_fraction > 0 and n ≥ 2), else 'train'.
    Pass only the slides that produced pairs: a failed slide must not take a place in the val quota."""
    free = [s.slide_id for s in specs if s.split is None]
    order = sorted(free, key=lambda sid: hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest())
    n_val = round(val_fraction * len(order))
    if val_fraction > 0 and len(order) >= 2:
        n_val = max(n_val, 1)
    val = set(order[:n_val])
    return {s.slide_id: s.split or ("val" if s.slide_id in val else "train") for s in specs}


@dataclasses.dataclass(frozen=True)
class PatchCoords:
    """Patch coordinates from a TRIDENT/CLAM h5: coords int64 [N, 2] level-0 top-left (x, y); patches of
    `patch_size_level0` level-0 px."""

    coords: np.ndarray
    patch_size_level0: float


def read_patch_coords(path: str) -> PatchCoords:
    """Read `coords` + attrs: TRIDENT (`patch_size_level0`) or CLAM (`patch_size` x `downsample`)."""
    if not os.path.isfile(path):
        raise CoordsError(f"{path}: patch-coordinate h5 not found")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise CoordsError(f"{path}: no `coords` dataset (expected TRIDENT/CLAM layout: coords [N, 2])")
            ds = f["coords"]
            coords = np.asarray(ds[()], dtype=np.int64)
            attrs = dict(ds.attrs)
    except OSError as err:
        raise CoordsError(f"{path}: not a readable h5 file: {err}") from None
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise CoordsError(f"{path}: `coords` has shape {coords.shape}, expected [N, 2] level-0 (x, y)")
    if "patch_size_level0" in attrs:
        size = float(attrs["patch_size_level0"])
    elif "patch_size" in attrs and "downsample" in attrs:
        size = float(attrs["patch_size"]) * float(np.ravel(attrs["downsample"])[0])
    elif "patch_size" in attrs and int(attrs.get("patch_level", -1)) == 0:
        size = float(attrs["patch_size"])
    else:
        raise CoordsError(f"{path}: `coords` attrs {sorted(attrs)} give no level-0 patch size (expected TRIDENT "
                          f"`patch_size_level0` or CLAM `patch_size` + `downsample`)")
    return PatchCoords(coords, size)
