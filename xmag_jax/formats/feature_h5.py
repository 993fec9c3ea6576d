"""The feature h5: one slide's tile embeddings in TRIDENT's layout, `DIR/{slide_id}.h5`.

Schema (version `VERSION`, stored as the root attr `xmag_feature_h5_version`; files without it, e.g. made by
TRIDENT itself, are read as version 1):
  * `features [N, D]` float32, one row per tile;
  * `coords [N, 2]` int64, the tile's level-0 top-left (x, y) in px;
  * attrs on the root and on `coords` (as TRIDENT): `patch_size` (px at the target), `patch_size_level0` (px),
    `mpp` (µm/px of the tiles), `level0_mpp`, `target_magnification`, `level0_magnification`, `name` (slide id),
    and the provenance `PROVENANCE_ATTRS` (`encoder`, `weights_fingerprint`, `preprocessing_fingerprint`);
  * optional `tokens [N, S, S, D]` float16 (`embed --tokens S`): each tile's patch-token grid average-pooled to
    S x S "words" (`pool_tokens`), with attrs `token_grid` (S), `patch_grid` (G, the encoder's token grid per
    tile side) and `um_per_word` (µm of tissue one word spans: patch_size px x mpp µm/px / S).

Written by `xmag_jax.embed` through `write` (temp file + rename); read by the evaluations, survival and
finetune through `read`, `read_tokens` and `list_files`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import h5py
import numpy as np

from xmag_jax import atomic, errors

VERSION = 1
VERSION_ATTR = "xmag_feature_h5_version"
TOKENS = "tokens"
TOKENS_DTYPE = np.float16
# The attrs that must agree across the feature files used together.
PROVENANCE_ATTRS = ("encoder", "mpp", "patch_size", "weights_fingerprint", "preprocessing_fingerprint")


class FeatureFileError(errors.UserError, ValueError):
    """A feature file is missing, unreadable, of another layout, or disagrees with the others (names the file)."""


@dataclasses.dataclass(frozen=True)
class SlideBag:
    """One slide's tile features: `features [N, D]` float32, `coords [N, 2]` int64 level-0 px."""

    slide_id: str
    path: pathlib.Path
    features: np.ndarray
    coords: np.ndarray
    attrs: dict


def plain(value: Any) -> Any:
    """An h5 attribute value as a plain Python value (bytes -> str, numpy scalars/arrays -> Python)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def pool_tokens(patches: np.ndarray, s: int) -> np.ndarray:
    """Adaptive average pooling of patch tokens `[B, G, G, D]` to `[B, S, S, D]` float32.

    Output cell i spans input rows floor(i G / S) .. ceil((i + 1) G / S) (as torch's AdaptiveAvgPool2d), so
    G need not be a multiple of S; with G = k S it is a plain k x k mean.
    """
    patches = np.asarray(patches, np.float32)
    if patches.ndim != 4 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patch tokens have shape {patches.shape}, expected [B, G, G, D]")
    g = patches.shape[1]
    if not 1 <= s <= g:
        raise ValueError(f"token grid S={s} must be between 1 and the patch grid G={g}")
    edges = [(i * g // s, -(-(i + 1) * g // s)) for i in range(s)]
    rows = np.stack([patches[:, a:b].mean(axis=1) for a, b in edges], axis=1)  # [B, S, G, D]
    return np.stack([rows[:, :, a:b].mean(axis=2) for a, b in edges], axis=2)


def write(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, attrs: dict,
          tokens: np.ndarray | None = None, patch_grid: int = 0) -> None:
    """Writes `features [N, D]` float32 and `coords [N, 2]` int64 with `attrs` (on the root and on `coords`)
    and, if given, pooled `tokens [N, S, S, D]` of a `patch_grid`-sided token grid; to a temp file, renamed."""
    with atomic.target(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v
            c.attrs[k] = v
        f.attrs[VERSION_ATTR] = VERSION
        if tokens is not None:
            tokens = np.asarray(tokens)
            if tokens.shape[:1] != np.shape(features)[:1] or tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
                raise ValueError(f"tokens have shape {tokens.shape}, expected [{len(features)}, S, S, D]")
            s = tokens.shape[1]
            d = f.create_dataset(TOKENS, data=tokens.astype(TOKENS_DTYPE))
            d.attrs["token_grid"] = s
            d.attrs["patch_grid"] = patch_grid
            d.attrs["um_per_word"] = float(attrs["patch_size"]) * float(attrs["mpp"]) / s


def read_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The root attrs of a feature file as plain values, or None if it cannot be read (e.g. half-written)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: plain(v) for k, v in f.attrs.items()}
    except OSError:
        return None


def read(path: str | os.PathLike) -> SlideBag:
    """Reads one feature file, checking its version and that `features [N, D]` and `coords [N, 2]` agree."""
    path = pathlib.Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(f"{path}: no 'features' dataset (datasets: {list(f.keys())})")
            features = np.asarray(f["features"][...], dtype=np.float32)
            coords = (np.asarray(f["coords"][...], dtype=np.int64) if "coords" in f
                      else np.zeros((len(features), 2), np.int64))
            attrs = {k: plain(v) for k, v in f.attrs.items()}
            if "coords" in f:
                attrs.update({k: plain(v) for k, v in f["coords"].attrs.items() if k not in attrs})
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable h5 file ({e})") from e
    version = attrs.get(VERSION_ATTR, 1)
    if version > VERSION:
        raise FeatureFileError(f"{path}: feature h5 version {version}, newer than this xmag_jax reads ({VERSION})")
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: 'features' has shape {features.shape}, expected [N, D]")
    if coords.shape != (len(features), 2):
        raise FeatureFileError(f"{path}: 'coords' has shape {coords.shape}, expected [{len(features)}, 2]")
    return SlideBag(path.stem, path, features, coords, attrs)


def read_tokens(path: str | os.PathLike, n: int) -> tuple[np.ndarray | None, dict]:
    """(`tokens [N, S, S, D]` float32 and their attrs) of a feature file with `n` tiles, or (None, {})."""
    with h5py.File(path, "r") as f:
        if TOKENS not in f:
            return None, {}
        d = f[TOKENS]
        words = np.asarray(d[...], np.float32)
        attrs = {k: plain(v) for k, v in d.attrs.items()}
    if words.ndim != 4 or words.shape[0] != n or words.shape[1] != words.shape[2]:
        raise FeatureFileError(f"{path}: 'tokens' has shape {words.shape}, expected [{n}, S, S, D]")
    return words, attrs


def list_files(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """`slide_id -> DIR/{slide_id}.h5` for the complete feature files in `directory` (temp files skipped)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FeatureFileError(f"feature directory {directory} does not exist")
    files = {p.stem: p for p in sorted(directory.glob("*.h5"))}
    if not files:
        raise FeatureFileError(f"no *.h5 feature files in {directory} (expected {{slide_id}}.h5 from xmag_jax.embed)")
    return files


def check_same_provenance(bags: list[SlideBag], directory: str | os.PathLike, shown: int = 3) -> None:
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
