"""Slide feature files (TRIDENT-layout h5) and slide labels, as the evaluations read them.

A feature file `DIR/{slide_id}.h5` holds `features [N, D]` float32 and `coords [N, 2]` int64 (level-0
top-left x, y in px), with the slide attributes (`patch_size`, `patch_size_level0`, `mpp`, ...) on the
root and on `coords`. A labels CSV has a header with `slide_id` and `label` columns (a UTF-8 byte-order mark,
as spreadsheet programs write, is accepted).

The feature files of one evaluation must come from one encoder and one tiling: files whose `encoder`, `mpp`,
`patch_size`, `weights_fingerprint` or `preprocessing_fingerprint` attrs differ are refused, naming a few
files of each kind.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import warnings

import h5py
import numpy as np

from xmag_jax import errors

# The attrs that must agree across the feature files of one evaluation (written by `xmag_jax.embed`).
PROVENANCE_ATTRS = ("encoder", "mpp", "patch_size", "weights_fingerprint", "preprocessing_fingerprint")


class EvalInputError(errors.UserError, ValueError):
    """Bad evaluation input (a file, an array, too few slides): the message names it."""


class FeatureFileError(EvalInputError):
    """A feature file is unreadable or disagrees with the others (names the file)."""


class LabelsError(EvalInputError):
    """The labels CSV is malformed or does not cover the slides (lists them)."""


@dataclasses.dataclass(frozen=True)
class SlideBag:
    """One slide's tile features: `features [N, D]` float32, `coords [N, 2]` int64 level-0 px."""

    slide_id: str
    path: pathlib.Path
    features: np.ndarray
    coords: np.ndarray
    attrs: dict


def read_labels(path: str | pathlib.Path) -> dict[str, str]:
    """`slide_id -> label` from a CSV with `slide_id` and `label` columns (other columns ignored)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LabelsError(f"labels CSV {path} does not exist (expected a CSV with slide_id,label columns)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in ("slide_id", "label") if c not in fields]
        if missing:
            raise LabelsError(f"{path}: missing column(s) {missing}; "
                              f"expected a header with slide_id,label, got {fields}")
        labels: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            slide_id, label = (row["slide_id"] or "").strip(), (row["label"] or "").strip()
            if not slide_id or not label:
                raise LabelsError(f"{path}:{line}: empty slide_id or label")
            if slide_id in labels and labels[slide_id] != label:
                raise LabelsError(f"{path}:{line}: slide {slide_id!r} labelled both {labels[slide_id]!r} and {label!r}")
            labels[slide_id] = label
    if not labels:
        raise LabelsError(f"{path}: no labelled slides")
    return labels


def feature_files(directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """`slide_id -> DIR/{slide_id}.h5` for the complete feature files in `directory` (temp files skipped)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FeatureFileError(f"feature directory {directory} does not exist")
    files = {p.stem: p for p in sorted(directory.glob("*.h5"))}
    if not files:
        raise FeatureFileError(f"no *.h5 feature files in {directory} (expected {{slide_id}}.h5 from xmag_jax.embed)")
    return files


def read_bag(path: str | pathlib.Path) -> SlideBag:
    """Reads one TRIDENT-layout feature file, checking `features [N, D]` and `coords [N, 2]` agree."""
    path = pathlib.Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(f"{path}: no 'features' dataset (datasets: {list(f.keys())})")
            features = np.asarray(f["features"][...], dtype=np.float32)
            coords = (np.asarray(f["coords"][...], dtype=np.int64) if "coords" in f
                      else np.zeros((len(features), 2), np.int64))
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if "coords" in f:
                attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items() if k not in attrs})
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable h5 file ({e})") from e
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: 'features' has shape {features.shape}, expected [N, D]")
    if coords.shape != (len(features), 2):
        raise FeatureFileError(f"{path}: 'coords' has shape {coords.shape}, expected [{len(features)}, 2]")
    return SlideBag(path.stem, path, features, coords, attrs)


def load_labelled_bags(
    directory: str | pathlib.Path, labels: dict[str, str], *, skip_unlabelled: bool = False
) -> list[tuple[SlideBag, str]]:
    """The labelled slides' bags, in slide-id order, with one feature dim across all files.

    Feature files whose slide is not in `labels` are an error listing them (or dropped with a warning when
    `skip_unlabelled`); labelled slides without a feature file and empty bags (no tissue) are dropped with
    a warning listing them.
    """
    files = feature_files(directory)
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled and not skip_unlabelled:
        raise LabelsError(
            f"labels CSV has no label for {len(unlabelled)} slide(s) with features in {directory}: {unlabelled}"
        )
    if unlabelled:
        warnings.warn(f"skipping {len(unlabelled)} unlabelled slide(s): {unlabelled}", stacklevel=2)
    no_features = sorted(set(labels) - set(files))
    if no_features:
        warnings.warn(f"{len(no_features)} labelled slide(s) have no feature file in {directory}: {no_features}",
                      stacklevel=2)
    bags, empty, dim, dim_file = [], [], None, None
    for slide_id in sorted(set(files) & set(labels)):
        bag = read_bag(files[slide_id])
        if dim is None:
            dim, dim_file = bag.features.shape[1], bag.path
        elif bag.features.shape[1] != dim:
            raise FeatureFileError(
                f"{bag.path}: feature dim {bag.features.shape[1]} differs from {dim} in {dim_file}; "
                "were these files made by different encoders?"
            )
        if len(bag.features) == 0:
            empty.append(slide_id)
            continue
        bags.append((bag, labels[slide_id]))
    check_same_provenance([b for b, _ in bags], directory)
    if empty:
        warnings.warn(f"skipping {len(empty)} slide(s) with no tiles (no tissue): {empty}", stacklevel=2)
    if not bags:
        raise LabelsError(f"no labelled slide with tiles in {directory}")
    return bags


def check_same_provenance(bags: list[SlideBag], directory: str | pathlib.Path, shown: int = 3) -> None:
    """Raises FeatureFileError if the bags' `PROVENANCE_ATTRS` differ, naming up to `shown` files per kind."""
    groups: dict[tuple, list[str]] = {}
    for bag in bags:
        groups.setdefault(tuple(bag.attrs.get(k) for k in PROVENANCE_ATTRS), []).append(bag.path.name)
    if len(groups) < 2:
        return
    kinds = []
    for key, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        made_by = ", ".join(f"{k}={v}" for k, v in zip(PROVENANCE_ATTRS, key) if v is not None) or "no provenance attrs"
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        kinds.append(f"{len(names)} file(s) with {made_by} ({', '.join(names[:shown])}{more})")
    raise FeatureFileError(f"{directory}: feature files of {len(groups)} different encoders/tilings cannot be "
                           f"evaluated together: {'; '.join(kinds)}; put each kind in its own folder")


def npz_arrays(path: str | pathlib.Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
               ) -> dict[str, np.ndarray]:
    """The `required` and present `optional` arrays of an npz; EvalInputError naming the file if one is missing."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z]
            if missing:
                raise EvalInputError(f"{path}: missing array(s) {missing}; has {list(z.keys())}")
            return {k: z[k] for k in required + optional if k in z}
    except (OSError, ValueError) as e:
        if isinstance(e, EvalInputError):
            raise
        raise EvalInputError(f"{path}: not a readable npz file ({e})") from e


def encode_labels(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """String labels -> (`int32 [N]` class indices, sorted class names)."""
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[label] for label in labels], np.int32), classes


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
