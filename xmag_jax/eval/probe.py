"""Linear probe (logistic regression) and kNN on tile features, cross-validated with slides kept whole.

    python -m xmag_jax.eval probe --labels labels.csv --features distilled=emb/student --features random=emb/random
    python -m xmag_jax.eval probe --npz tiles.npz        # features [N, D], labels [N], optional groups [N]

Each tile takes its slide's label. Folds are stratified by label and grouped by slide (no slide has tiles
on both sides of a split); out-of-fold predictions are pooled and scored with balanced accuracy and
macro AUC, with slide-level bootstrap confidence intervals.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from absl import flags
from sklearn import model_selection, neighbors, pipeline, preprocessing
from sklearn.linear_model import LogisticRegression

from xmag_jax import cli, errors
from xmag_jax.eval import features as feats
from xmag_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class TileSet:
    """Tile features `x [N, D]` float32, labels `y int [N]`, slide of each tile `groups [N]` (or None)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    classes: list[str]


def tiles_from_h5(
    directory: str | pathlib.Path,
    labels: dict[str, str],
    *,
    max_tiles_per_slide: int | None = None,
    skip_unlabelled: bool = False,
    seed: int = 0,
) -> TileSet:
    """All tiles of the labelled slides in `directory` (at most `max_tiles_per_slide` each, sampled)."""
    rng = np.random.default_rng(seed)
    xs, ys, gs = [], [], []
    for bag, label in feats.load_labelled_bags(directory, labels, skip_unlabelled=skip_unlabelled):
        x = bag.features
        if max_tiles_per_slide and len(x) > max_tiles_per_slide:
            x = x[np.sort(rng.choice(len(x), max_tiles_per_slide, replace=False))]
        xs.append(x)
        ys += [label] * len(x)
        gs += [bag.slide_id] * len(x)
    y, classes = feats.encode_labels(ys)
    return TileSet(np.concatenate(xs), y, np.array(gs), classes)


def tiles_from_npz(path: str | pathlib.Path) -> TileSet:
    """Arrays `features [N, D]`, `labels [N]` (int or str) and optional `groups [N]` from an npz."""
    z = feats.npz_arrays(path, ("features", "labels"), ("groups",))
    x, labels, groups = z["features"].astype(np.float32), z["labels"], z.get("groups")
    if x.ndim != 2 or len(labels) != len(x) or (groups is not None and len(groups) != len(x)):
        raise feats.EvalInputError(
            f"{path}: expected features [N, D], labels [N], groups [N]; got {x.shape}, {labels.shape}")
    y, classes = feats.encode_labels([str(label) for label in labels])
    return TileSet(x, y, groups, classes)


def make_classifiers(*, c: float = 1.0, knn_k: int = 20, seed: int = 0) -> dict:
    """The probes: standardised L2-regularised logistic regression, and kNN (k neighbours) on features
    centred on the training mean and L2-normalised (SimpleShot, as in UNI's kNN evaluation)."""
    return {
        "linear": pipeline.make_pipeline(
            preprocessing.StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
        ),
        "knn": pipeline.make_pipeline(preprocessing.StandardScaler(with_std=False), preprocessing.Normalizer(),
                                      neighbors.KNeighborsClassifier(n_neighbors=knn_k)),
    }


def splits(tiles: TileSet, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds grouped by slide; `n_folds` shrinks to the fewest slides any class has."""
    n_classes = len(tiles.classes)
    if n_classes < 2:
        raise feats.EvalInputError(f"need at least two classes, got {tiles.classes}")
    if tiles.groups is None:
        per_class = np.bincount(tiles.y, minlength=n_classes).min()
        k = min(n_folds, int(per_class))
        if k < 2:
            raise feats.EvalInputError(f"need at least 2 samples per class for cross-validation, got {per_class}")
        cv = model_selection.StratifiedKFold(k, shuffle=True, random_state=seed)
        return list(cv.split(tiles.x, tiles.y))
    slide_ids, first = np.unique(tiles.groups, return_index=True)
    per_class = np.bincount(tiles.y[first], minlength=n_classes).min()
    k = min(n_folds, int(per_class))
    if k < 2:
        raise feats.EvalInputError(f"need at least 2 slides per class for slide-level folds, "
                         f"got {per_class} ({len(slide_ids)} slides)")
    cv = model_selection.StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    return list(cv.split(tiles.x, tiles.y, tiles.groups))


def run_probe(
    tiles: TileSet, *, n_folds: int = 5, c: float = 1.0, knn_k: int = 20, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """Out-of-fold probabilities for each probe, scored: `{..., 'linear'|'knn': {metric: Estimate}}`."""
    folds = splits(tiles, n_folds, seed)
    n_classes = len(tiles.classes)
    summary: dict = {
        "n_tiles": int(len(tiles.y)),
        "n_slides": int(len(np.unique(tiles.groups))) if tiles.groups is not None else None,
        "feature_dim": int(tiles.x.shape[1]),
        "classes": tiles.classes,
        "folds": len(folds),
    }
    for name in make_classifiers():
        proba = np.zeros((len(tiles.y), n_classes), np.float64)
        for train, test in folds:
            k = min(knn_k, len(train))
            clf = make_classifiers(c=c, knn_k=k, seed=seed)[name].fit(tiles.x[train], tiles.y[train])
            proba[np.ix_(test, clf.classes_)] = clf.predict_proba(tiles.x[test])
        scores = metrics.bootstrap(tiles.y, proba, groups=tiles.groups, n_resamples=n_bootstrap, seed=seed)
        summary[name] = scores
    return summary


PROG = "python -m xmag_jax.eval probe"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("features", None, "[NAME=]DIR: directory of slide h5 files (repeat the flag to "
                              "compare encoders)", flag_values=fv)
    flags.DEFINE_string("npz", None, "npz with features [N, D], labels [N], optional groups [N]", flag_values=fv)
    flags.DEFINE_string("labels", None, "CSV with slide_id,label (required with --features)", flag_values=fv)
    flags.DEFINE_integer("folds", 5, "cross-validation folds, slides kept whole (fewer if a class has fewer slides)",
                         flag_values=fv)
    flags.DEFINE_float("c", 1.0, "C, the inverse L2 strength of the logistic regression (larger = weaker "
                       "regularisation)", flag_values=fv)
    flags.DEFINE_integer("knn_k", 20, "neighbours of the kNN probe (tiles)", flag_values=fv)
    flags.DEFINE_integer("max_tiles_per_slide", None, "random subsample of each slide's tiles (none: all)",
                         flag_values=fv)
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples for the intervals", flag_values=fv)
    flags.DEFINE_bool("skip_unlabelled", False, "drop feature files without a label instead of failing",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of folds, subsampling and bootstrap", flag_values=fv)
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__.split("\n\n")[0], one_of=(("features", "npz"),))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if args.npz:
        sets = {pathlib.Path(args.npz).stem: tiles_from_npz(args.npz)}
    else:
        if not args.labels:
            raise errors.UserError("--labels is required with --features")
        labels = feats.read_labels(args.labels)
        sets = {}
        for spec in args.features:
            name, _, directory = spec.rpartition("=")
            sets[name or pathlib.Path(directory).name] = tiles_from_h5(
                directory, labels, max_tiles_per_slide=args.max_tiles_per_slide,
                skip_unlabelled=args.skip_unlabelled, seed=args.seed,
            )
    results = {}
    for name, tiles in sets.items():
        r = run_probe(tiles, n_folds=args.folds, c=args.c, knn_k=args.knn_k, n_bootstrap=args.bootstrap, seed=args.seed)
        results[name] = r
        print(f"{name}: {r['n_tiles']} tiles, {r['n_slides']} slides, D={r['feature_dim']}, {r['folds']} folds")
        for method in ("linear", "knn"):
            m = r[method]
            print(f"  {method:6s} balanced_acc {m['balanced_accuracy']}  auc {m['auc']}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2, default=metrics.Estimate.as_dict))
    return 0
