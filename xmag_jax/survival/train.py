"""Training and inference of one survival model on a set of slides (one cross-validation unit).

Each step draws `train.batch_size` slides, a crop of at most `train.max_tiles` tiles of each, and minimises the Cox
partial likelihood of the batch (+ `loss.binary_weight` x the "recurrence within `loss.binary_months`" cross-entropy
when that head is on). AdamW, `train.epochs` passes over the training slides. With `train.val_fraction` > 0 a
stratified share of the training slides is held out and the parameters of the epoch with the best held-out C-index
are kept (early stopping; small cohorts are memorised within a few epochs otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from sklearn import model_selection

from xmag_jax.eval.mil import adamw
from xmag_jax.survival import cox, report
from xmag_jax.survival.batching import make_batch
from xmag_jax.survival.slides import Slide

MODEL_KEYS = ("features", "words", "neighbours", "centres", "mask", "local")


def n_outputs(config: ml_collections.ConfigDict) -> int:
    """1 (log-risk) or 2 (log-risk, logit of recurrence within `loss.binary_months`)."""
    return 2 if config.loss.binary_months > 0 else 1


@functools.cache
def _step_fn(binary_months: float, binary_weight: float):
    # One jitted step per loss setting: the floats are closed over, so a new setting compiles anew.
    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(m):
            out = m({k: batch[k] for k in MODEL_KEYS})
            loss = cox.cox_nll(out[:, 0], batch["time"], batch["event"], batch["valid"])
            if binary_months > 0:
                loss += binary_weight * cox.binary_bce(out[:, 1], batch["time"], batch["event"], batch["valid"],
                                                       binary_months)
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return step


@nnx.jit
def _forward(model, batch):
    return model(batch)


def fit(model: nnx.Module, slides: Sequence[Slide], time: np.ndarray, event: np.ndarray,
        config: ml_collections.ConfigDict, seed: int) -> dict:
    """Trains `model` in place on `slides` with outcomes `time [N]` (months), `event [N]`.

    Returns `losses` (mean per epoch), and with early stopping `val_c_index` per epoch and the `best_epoch` kept.
    """
    t = config.train
    rng = np.random.default_rng(seed)
    train_idx, val_idx = np.arange(len(slides)), np.array([], int)
    if t.val_fraction > 0:
        stratify = event if min(np.bincount(event, minlength=2)) >= 2 else None  # too few of a kind: unstratified
        train_idx, val_idx = model_selection.train_test_split(train_idx, test_size=t.val_fraction, stratify=stratify,
                                                              random_state=seed)
    optimizer = nnx.Optimizer(model, adamw(float(t.lr), float(t.weight_decay)), wrt=nnx.Param)
    step = _step_fn(float(config.loss.binary_months), float(config.loss.binary_weight))
    history: dict = {"losses": [], "val_c_index": []}
    best, best_state = -np.inf, None
    for epoch in range(t.epochs):
        model.train()
        order = rng.permutation(train_idx)
        losses = []
        for start in range(0, len(order), t.batch_size):
            idx = order[start: start + t.batch_size]
            if event[idx].sum() == 0:
                continue  # no event, no partial likelihood
            batch = make_batch([slides[i] for i in idx], time[idx], event[idx], batch_size=t.batch_size,
                               global_attention_max_tiles=config.model.global_attention_max_tiles,
                               max_tiles=t.max_tiles, rng=rng)
            losses.append(step(model, optimizer, {k: jnp.asarray(v) for k, v in batch.items()}))
        history["losses"].append(float(np.mean([float(loss) for loss in losses])) if losses else float("nan"))
        if len(val_idx):
            risk = predict(model, [slides[i] for i in val_idx], config)[:, 0]
            score = report.c_index(time[val_idx], event[val_idx], risk)
            history["val_c_index"].append(score)
            if score > best:  # NaN (no event held out) never is: then the last epoch is kept
                best, best_state = score, jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
                history["best_epoch"] = epoch
    if best_state is not None:
        nnx.update(model, best_state)
    model.eval()
    return history


def predict(model: nnx.Module, slides: Sequence[Slide], config: ml_collections.ConfigDict) -> np.ndarray:
    """Outputs `[N, n_out]` of every slide on all its tiles (column 0: log-risk)."""
    model.eval()
    b = config.train.eval_batch_size
    outs = []
    for start in range(0, len(slides), b):
        chunk = slides[start: start + b]
        batch = make_batch(chunk, np.ones(len(chunk)), np.zeros(len(chunk)), batch_size=b,
                           global_attention_max_tiles=config.model.global_attention_max_tiles)
        out = _forward(model, {k: jnp.asarray(batch[k]) for k in MODEL_KEYS})
        outs.append(np.asarray(out[: len(chunk)], np.float64))
    return np.concatenate(outs)
