"""Classification metrics with bootstrap confidence intervals.

`proba` is `[N, C]` class probabilities; `y` is `int [N]` class indices in `[0, C)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn import metrics


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval (NaN bounds when no resample was usable)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float(metrics.balanced_accuracy_score(y, proba.argmax(axis=1)))


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary ROC AUC, or the macro one-vs-rest AUC over `C > 2` classes; NaN if `y` has one class."""
    n_classes = proba.shape[1]
    if len(np.unique(y)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(metrics.roc_auc_score(y, proba[:, 1]))
    present = np.unique(y)
    if len(present) < n_classes:  # OvR AUC over the classes present, probabilities renormalised
        sub = proba[:, present] / proba[:, present].sum(axis=1, keepdims=True)
        return float(metrics.roc_auc_score(np.searchsorted(present, y), sub, multi_class="ovr", average="macro"))
    return float(metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro"))


METRICS = {"balanced_accuracy": balanced_accuracy, "auc": macro_auc}


def bootstrap(
    y: np.ndarray,
    proba: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Each metric in `METRICS` with a percentile bootstrap interval.

    With `groups` (e.g. slide ids of tiles) whole groups are resampled, since tiles of one slide are not
    independent; otherwise single predictions are. Resamples with a single class are skipped.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    draws: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        if len(np.unique(y[idx])) < 2:
            continue
        for name, fn in METRICS.items():
            draws[name].append(fn(y[idx], proba[idx]))
    alpha = (1.0 - confidence) / 2
    out = {}
    for name, fn in METRICS.items():
        d = np.asarray(draws[name])
        low, high = (np.quantile(d, [alpha, 1 - alpha]) if len(d) else (np.nan, np.nan))
        out[name] = Estimate(fn(y, proba), float(low), float(high))
    return out
