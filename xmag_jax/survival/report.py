"""Survival metrics, Kaplan-Meier plots and subgroup tables of out-of-fold risks (lifelines, scikit-survival).

Per fold: Harrell's C-index (lifelines `concordance_index`), the cumulative/dynamic AUC at T months
(scikit-survival `cumulative_dynamic_auc`, IPCW with the training fold's censoring distribution), and the hazard
ratio of high vs low risk, split at the training folds' median risk (lifelines `CoxPHFitter` on the group
indicator, 95 % CI) with the log-rank p (lifelines `logrank_test`). Pooled over folds (each test slide grouped
by its own fold's threshold): the same HR, a Kaplan-Meier plot and subgroup C-indices.
"""

from __future__ import annotations

import math
import pathlib
import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from lifelines import CoxPHFitter, KaplanMeierFitter  # noqa: E402
from lifelines.statistics import logrank_test  # noqa: E402
from lifelines.utils import concordance_index  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from sksurv.metrics import cumulative_dynamic_auc  # noqa: E402
from sksurv.util import Surv  # noqa: E402

NAN = float("nan")


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: the fraction of comparable pairs where the higher risk recurs first (NaN without events)."""
    if event.sum() == 0:
        return NAN
    return float(concordance_index(time, -risk, event))


def auc_at(train_time, train_event, time, event, risk, months: float) -> float:
    """Cumulative/dynamic AUC at `months`: cases recur by then, controls are still free; NaN when undefined there
    (no case or no control among the test slides, or `months` outside the follow-up)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc, _ = cumulative_dynamic_auc(Surv.from_arrays(train_event.astype(bool), train_time),
                                            Surv.from_arrays(event.astype(bool), time), risk, [months])
        return float(auc[0])
    except ValueError:
        return NAN


def hazard_ratio(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> dict:
    """HR of `high` vs the rest (CoxPH on the indicator) with 95 % CI, and the log-rank p; NaN if a group is empty."""
    high = np.asarray(high, bool)
    if high.all() or not high.any() or event.sum() == 0:
        return {"hazard_ratio": NAN, "hr_ci95": [NAN, NAN], "logrank_p": NAN, "n_high": int(high.sum())}
    df = pd.DataFrame({"time": time, "event": event, "high": high.astype(float)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = CoxPHFitter().fit(df, "time", "event")
    ci = cph.confidence_intervals_.loc["high"].to_numpy()
    p = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
    return {"hazard_ratio": float(np.exp(cph.params_["high"])), "hr_ci95": [float(np.exp(ci[0])), float(np.exp(ci[1]))],
            "logrank_p": float(p), "n_high": int(high.sum())}


def fold_metrics(train_time, train_event, train_risk, time, event, risk, months: float) -> dict:
    threshold = float(np.median(train_risk))
    return {"n_test": int(len(time)), "events": int(event.sum()), "c_index": c_index(time, event, risk),
            "auc": auc_at(train_time, train_event, time, event, risk, months), "threshold": threshold,
            **hazard_ratio(time, event, risk > threshold)}


def km_plot(path: pathlib.Path, time: np.ndarray, event: np.ndarray, high: np.ndarray, title: str) -> None:
    """Kaplan-Meier curves of the high and low risk groups (recurrence-free fraction vs months), as a PNG."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, group in (("low risk", ~high), ("high risk", high)):
        if group.any():
            fitter = KaplanMeierFitter(label=f"{name} (n={int(group.sum())})").fit(time[group], event[group])
            fitter.plot_survival_function(ax=ax)
    ax.set_xlabel("months")
    ax.set_ylabel("recurrence-free")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def subgroups(time, event, risk, covariates: dict[str, np.ndarray], names) -> dict:
    """C-index of pooled out-of-fold risks within subgroups of each covariate in `names`."""
    table = {}
    for name in names:
        values = covariates[name]
        unique = np.unique(values)
        if len(unique) <= 5:
            groups = {f"{name}={v:g}": values == v for v in unique}
        else:
            median = float(np.median(values))
            groups = {f"{name}<={median:g}": values <= median, f"{name}>{median:g}": values > median}
        table[name] = {label: {"n": int(g.sum()), "events": int(event[g].sum()),
                               "c_index": c_index(time[g], event[g], risk[g])} for label, g in groups.items()}
    return table


def summarize(folds: list[dict]) -> dict:
    """`*_mean` over folds (NaN folds left out) of c_index, auc, hazard_ratio."""
    out = {}
    for key in ("c_index", "auc", "hazard_ratio"):
        values = [f[key] for f in folds if not math.isnan(f[key])]
        out[f"{key}_mean"] = float(np.mean(values)) if values else NAN
    return out
