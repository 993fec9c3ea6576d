"""Slide labels and the labelled feature bags the evaluations read.

The feature files are `xmag_jax.formats.feature_h5` (TRIDENT layout). A labels CSV has a header with
`slide_id` and `label` columns (a UTF-8 byte-order mark, as spreadsheet programs write, is accepted). The
feature files of one evaluation must come from one encoder and one tiling (`feature_h5.check_same_provenance`).
"""

from __future__ import annotations

import csv
import pathlib
import warnings

import numpy as np

from xmag_jax import errors
from xmag_jax.formats import feature_h5
from xmag_jax.formats.feature_h5 import FeatureFileError, SlideBag


class EvalInputError(errors.UserError, ValueError):
    """Bad evaluation input (a file, an array, too few slides): the message names it."""


class LabelsError(EvalInputError):
    """The labels CSV is malformed or does not cover the slides (lists them)."""


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


def load_labelled_bags(
    directory: str | pathlib.Path, labels: dict[str, str], *, skip_unlabelled: bool = False
) -> list[tuple[SlideBag, str]]:
    """The labelled slides' bags, in slide-id order, with one feature dim across all files.

    Feature files whose slide is not in `labels` are an error listing them (or dropped with a warning when
    `skip_unlabelled`); labelled slides without a feature file and empty bags (no tissue) are dropped with
    a warning listing them.
    """
    files = feature_h5.list_files(directory)
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
        bag = feature_h5.read(files[slide_id])
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
    feature_h5.check_same_provenance([b for b, _ in bags], directory)
    if empty:
        warnings.warn(f"skipping {len(empty)} slide(s) with no tiles (no tissue): {empty}", stacklevel=2)
    if not bags:
        raise LabelsError(f"no labelled slide with tiles in {directory}")
    return bags


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
