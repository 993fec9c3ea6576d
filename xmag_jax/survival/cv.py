"""k-fold cross-validation of all models on the same folds, resumable per (fold, model) unit.

Workdir layout:
  `run.json`                      the config and fold of every slide; a rerun with another one is refused
  `checkpoints/fold{f}_{model}/`  Orbax checkpoint of a trained neural model's parameters
  `units/fold{f}_{model}.json`    that unit's training and test risks, written (atomically) after its checkpoint
  `results.json`, `km_{model}.png` the report, rewritten at the end of every run
A killed run redoes only the units without a `units/*.json`: a unit is the training of one model on one fold.
"""

from __future__ import annotations

import json
import math
import pathlib
import time as timer
import warnings

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from sklearn import model_selection

from xmag_jax import atomic
from xmag_jax.errors import ConfigError, UserError
from xmag_jax.survival import model as model_lib
from xmag_jax.survival import report, train
from xmag_jax.survival.clinical import Clinical
from xmag_jax.survival.slides import Slide

MODELS = (*model_lib.NEURAL, "clinical")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the key for values that cannot run (before any data is read)."""
    unknown = [m for m in config.models if m not in MODELS]
    if unknown or not config.models:
        raise ConfigError(f"config.models: {list(config.models)}; expected a non-empty subset of {list(MODELS)}")
    if config.folds < 2:
        raise ConfigError(f"config.folds: {config.folds}; expected >= 2")
    for key in ("data.features", "data.clinical"):
        if not config[key.split(".")[0]][key.split(".")[1]]:
            raise ConfigError(f"config.{key} is empty; pass --config.{key}=PATH")
    if config.model.dim % 4:
        raise ConfigError(f"config.model.dim: {config.model.dim}; expected a multiple of 4 (2-D positions)")
    for key in ("phrase_heads", "sentence_heads"):
        if config.model.dim % config.model[key]:
            raise ConfigError(f"config.model.{key}: {config.model[key]} does not divide model.dim {config.model.dim}")
    if config.transformer_no_pos.dim % config.transformer_no_pos.heads:
        raise ConfigError("config.transformer_no_pos.heads must divide transformer_no_pos.dim")
    if config.train.batch_size < 2:
        raise ConfigError(f"config.train.batch_size: {config.train.batch_size}; the Cox loss needs >= 2 slides a step")


def assign_folds(clinical: Clinical, k: int, seed: int) -> np.ndarray:
    """`int [N]` fold of each slide: the CSV's `fold` column (values 0..k-1), else stratified by event, seeded."""
    events = int(clinical.event.sum())
    if events < k:
        raise UserError(f"not enough events for {k} folds: {events} recurrence(s) among {len(clinical.slide_ids)} "
                        "slides; lower config.folds")
    if clinical.fold is not None:
        found = sorted(set(clinical.fold.tolist()))
        if found != list(range(k)):
            raise UserError(
                f"the clinical CSV's fold column has values {found}; expected 0..{k - 1} (config.folds={k})")
        short = [f for f in range(k) if clinical.event[clinical.fold == f].sum() == 0]
        if short:
            raise UserError(f"not enough events for {k} folds: fold(s) {short} of the CSV's fold column have no event")
        return clinical.fold.astype(int)
    fold = np.zeros(len(clinical.slide_ids), int)
    cv = model_selection.StratifiedKFold(k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(cv.split(np.zeros(len(fold)), clinical.event)):
        fold[test] = f
    return fold


def _check_run(workdir: pathlib.Path, record: dict) -> None:
    path = workdir / "run.json"
    if path.exists():
        if json.loads(path.read_text()) != record:
            raise ConfigError(f"{workdir} holds a run with another config, slides or folds ({path}); "
                              "resume it with the same ones or use a new --workdir")
        return
    with atomic.target(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def _train_unit(name: str, fold: int, slides: list[Slide], clinical: Clinical, tr: np.ndarray, te: np.ndarray,
                config: ml_collections.ConfigDict, ckpt_dir: pathlib.Path) -> dict:
    """Trains `name` on slides `tr`, returns risks of `tr` and `te` (log partial hazards)."""
    seed = config.seed * 1000 + fold * 10 + MODELS.index(name)
    if name == "clinical":
        return _clinical_unit(clinical, tr, te, config)
    word_dim, n_words = slides[0].words.shape[2], slides[0].words.shape[1]
    model = model_lib.build(name, word_dim, n_words, slides[0].features.shape[1], train.n_outputs(config), config, seed)
    history = train.fit(model, [slides[i] for i in tr], clinical.time[tr], clinical.event[tr], config, seed)
    out_tr = train.predict(model, [slides[i] for i in tr], config)
    out_te = train.predict(model, [slides[i] for i in te], config)
    with ocp.StandardCheckpointer() as ckptr:
        path = ckpt_dir / f"fold{fold}_{name}"
        ckptr.save(path.absolute(), nnx.state(model, nnx.Param), force=True)
    unit = {"train_risk": out_tr[:, 0].tolist(), "test_risk": out_te[:, 0].tolist(), **history}
    if out_te.shape[1] > 1:
        unit["test_binary_logit"] = out_te[:, 1].tolist()
    return unit


def _clinical_unit(clinical: Clinical, tr: np.ndarray, te: np.ndarray, config: ml_collections.ConfigDict) -> dict:
    import pandas as pd
    from lifelines import CoxPHFitter

    if not clinical.covariates:
        raise UserError("model 'clinical' needs covariate columns in the clinical CSV (or drop it from config.models)")
    frame = pd.DataFrame(clinical.covariates)
    data = frame.iloc[tr].assign(time=clinical.time[tr], event=clinical.event[tr])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = CoxPHFitter(penalizer=config.clinical.penalizer).fit(data, "time", "event")
    risk = lambda rows: np.log(cph.predict_partial_hazard(frame.iloc[rows]).to_numpy()).tolist()  # noqa: E731
    return {"train_risk": risk(tr), "test_risk": risk(te), "coefficients": cph.params_.to_dict()}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, slides: list[Slide], clinical: Clinical,
        log=print) -> dict:
    """Cross-validates `config.models` on `slides` (in `clinical.slide_ids` order); writes and returns results."""
    k = config.folds
    fold = assign_folds(clinical, k, config.seed)
    _check_run(workdir, {"config": json.loads(config.to_json()), "slides": clinical.slide_ids,
                         "fold": fold.tolist()})
    units_dir, ckpt_dir = workdir / "units", workdir / "checkpoints"
    units_dir.mkdir(parents=True, exist_ok=True)
    units: dict[tuple[int, str], dict] = {}
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        for name in config.models:
            path = units_dir / f"fold{f}_{name}.json"
            if path.exists():
                units[f, name] = json.loads(path.read_text())
                log(f"fold {f} {name}: done before ({path})")
                continue
            start = timer.time()
            unit = _train_unit(name, f, slides, clinical, tr, te, config, ckpt_dir)
            unit["seconds"] = timer.time() - start
            with atomic.target(path) as tmp:
                tmp.write_text(json.dumps(unit))
            units[f, name] = unit
            c = report.c_index(clinical.time[te], clinical.event[te], np.asarray(unit["test_risk"]))
            log(f"fold {f} {name}: test C-index {c:.3f} ({unit['seconds']:.0f} s)")
    return _results(config, workdir, clinical, fold, units)


def _results(config, workdir: pathlib.Path, clinical: Clinical, fold: np.ndarray, units: dict) -> dict:
    t, e, months = clinical.time, clinical.event, float(config.eval.auc_months)
    models = {}
    for name in config.models:
        folds, oof_risk, oof_high = [], np.zeros(len(t)), np.zeros(len(t), bool)
        for f in range(config.folds):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            unit = units[f, name]
            r_tr, r_te = np.asarray(unit["train_risk"]), np.asarray(unit["test_risk"])
            m = report.fold_metrics(t[tr], e[tr], r_tr, t[te], e[te], r_te, months)
            folds.append({"fold": f, **m})
            oof_risk[te], oof_high[te] = r_te, r_te > m["threshold"]
        pooled = {"c_index": report.c_index(t, e, oof_risk), **report.hazard_ratio(t, e, oof_high)}
        plot = workdir / f"km_{name}.png"
        with atomic.target(plot) as tmp:
            report.km_plot(tmp, t, e, oof_high, f"{name}: out-of-fold high vs low risk, "
                           f"HR {pooled['hazard_ratio']:.2f}, log-rank p {pooled['logrank_p']:.2g}")
        models[name] = {**report.summarize(folds), "folds": folds, "pooled": pooled, "km_plot": plot.name,
                        "subgroups": report.subgroups(t, e, oof_risk, clinical.covariates, config.eval.subgroups),
                        "out_of_fold_risk": dict(zip(clinical.slide_ids, oof_risk.tolist()))}
    results = {"models": models, "folds": config.folds, "n_slides": len(t), "n_events": int(e.sum()),
               "auc_months": months, "fold_of_slide": dict(zip(clinical.slide_ids, fold.tolist()))}
    with atomic.target(workdir / "results.json") as tmp:
        tmp.write_text(json.dumps(_finite(results), indent=1))
    return results


def _finite(obj):
    """NaN -> None, so results.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

