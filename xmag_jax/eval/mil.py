"""Gated-attention ABMIL (Ilse et al. 2018, CLAM sizes 512/256) on slide bags, k-fold cross-validated.

    python -m xmag_jax.eval mil --features emb/student --labels labels.csv [--folds 5] [--epochs 20] \
        [--heatmap out/heatmaps --slides slides/]

Bags are the tile features of one slide (`[N, D]`), padded to a power-of-two length with a mask so that
`jit` compiles once per bag-size bucket. Folds are stratified by slide label; each fold trains a fresh
model on the other folds and reports AUC and balanced accuracy on its own slides; the summary is
mean ± std over folds, and the same metrics pooled over all out-of-fold predictions. The held-out
attention of every slide is kept for heatmaps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from sklearn import model_selection

from xmag_jax import cli
from xmag_jax.eval import features as feats
from xmag_jax.eval import metrics

MIN_BUCKET = 16


class GatedABMIL(nnx.Module):
    """Gated attention pooling: `x [B, N, D]`, `mask [B, N]` -> `(logits [B, C], attention [B, N])`."""

    def __init__(self, in_dim: int, n_classes: int, *, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.attn_a = nnx.Linear(hidden, attn_dim, rngs=rngs)
        self.attn_b = nnx.Linear(hidden, attn_dim, rngs=rngs)
        self.attn_c = nnx.Linear(attn_dim, 1, rngs=rngs)
        self.classifier = nnx.Linear(hidden, n_classes, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.dropout(jax.nn.relu(self.fc(x)))
        gate = self.dropout(jnp.tanh(self.attn_a(h)) * jax.nn.sigmoid(self.attn_b(h)))
        scores = jnp.where(mask, self.attn_c(gate)[..., 0], -jnp.inf)
        attention = jax.nn.softmax(scores, axis=-1)
        slide = jnp.einsum("bn,bnd->bd", attention, h)
        return self.classifier(slide), attention


@dataclasses.dataclass(frozen=True)
class MILConfig:
    epochs: int = 20
    learning_rate: float = 2e-4
    weight_decay: float = 1e-5
    batch_size: int = 1  # bags per step (CLAM trains one slide at a time)
    max_instances: int = 4096  # tiles sampled per training bag per epoch (all tiles at evaluation)
    hidden: int = 512
    attn_dim: int = 256
    dropout: float = 0.25
    seed: int = 0


def pad_bags(bags: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bags `[N_i, D]` -> `x [B, L, D]` zero-padded and `mask [B, L]`, L the next power of two >= max N_i."""
    length = max(MIN_BUCKET, 1 << int(np.ceil(np.log2(max(len(b) for b in bags)))))
    x = np.zeros((len(bags), length, bags[0].shape[1]), np.float32)
    mask = np.zeros((len(bags), length), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


@nnx.jit
def _train_step(model: GatedABMIL, optimizer: nnx.Optimizer, x, mask, y):
    def loss_fn(m):
        logits, _ = m(x, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _predict(model: GatedABMIL, x, mask):
    logits, attention = model(x, mask)
    return jax.nn.softmax(logits, axis=-1), attention


def train(bags: list[np.ndarray], y: np.ndarray, n_classes: int, cfg: MILConfig) -> GatedABMIL:
    """A fresh GatedABMIL trained on `bags` (`[N_i, D]` each) with labels `y int [B]`."""
    rng = np.random.default_rng(cfg.seed)
    model = GatedABMIL(bags[0].shape[1], n_classes, hidden=cfg.hidden, attn_dim=cfg.attn_dim,
                       dropout=cfg.dropout, rngs=nnx.Rngs(cfg.seed))
    optimizer = nnx.Optimizer(model, adamw(cfg.learning_rate, cfg.weight_decay), wrt=nnx.Param)
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(len(bags))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = [_subsample(bags[i], cfg.max_instances, rng) for i in idx]
            x, mask = pad_bags(batch)
            _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(y[idx]))
    model.eval()
    return model


def predict(model: GatedABMIL, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities `[B, C]` and each bag's attention over its tiles (`[N_i]`, sums to 1)."""
    probas, attentions = [], []
    for bag in bags:
        x, mask = pad_bags([bag])
        proba, attention = _predict(model, jnp.asarray(x), jnp.asarray(mask))
        probas.append(np.asarray(proba[0]))
        attentions.append(np.asarray(attention[0, : len(bag)]))
    return np.stack(probas), attentions


def cross_validate(bags: list[np.ndarray], y: np.ndarray, n_classes: int, n_folds: int, cfg: MILConfig) -> dict:
    """Stratified k-fold over slides: per-fold AUC / balanced accuracy, mean and std, held-out attention."""
    per_class = np.bincount(y, minlength=n_classes).min()
    k = min(n_folds, int(per_class))
    if k < 2:
        raise feats.EvalInputError(
            f"need at least 2 slides per class for {n_folds}-fold cross-validation, got {per_class}")
    cv = model_selection.StratifiedKFold(k, shuffle=True, random_state=cfg.seed)
    folds, attention, proba = [], [None] * len(bags), np.zeros((len(bags), n_classes))
    for fold, (tr, te) in enumerate(cv.split(np.zeros(len(y)), y)):
        model = train([bags[i] for i in tr], y[tr], n_classes, dataclasses.replace(cfg, seed=cfg.seed + fold))
        p, att = predict(model, [bags[i] for i in te])
        proba[te] = p
        for i, a in zip(te, att):
            attention[i] = a
        folds.append({"fold": fold, "n_test": int(len(te)),
                      "auc": metrics.macro_auc(y[te], p), "balanced_accuracy": metrics.balanced_accuracy(y[te], p)})
    summary = {}
    for name, fn in metrics.METRICS.items():
        values = np.array([f[name] for f in folds], float)
        summary[name] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)),
                         "pooled": fn(y, proba)}  # over all out-of-fold predictions
    return {"folds": folds, "summary": summary, "proba": proba, "attention": attention}


@functools.cache
def adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    # One transformation object per setting: it is static in the jitted step, so a new one would recompile.
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _subsample(bag: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return bag if len(bag) <= n else bag[np.sort(rng.choice(len(bag), n, replace=False))]


PROG = "python -m xmag_jax.eval mil"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("features", None, "directory of slide h5 files (TRIDENT layout)", flag_values=fv)
    flags.DEFINE_string("labels", None, "CSV with slide_id,label", flag_values=fv)
    flags.DEFINE_integer("folds", 5, "stratified cross-validation folds over slides (fewer if a class has fewer "
                         "slides)", flag_values=fv)
    flags.DEFINE_integer("epochs", MILConfig.epochs, "training epochs (passes over the slides)", flag_values=fv)
    flags.DEFINE_float("lr", MILConfig.learning_rate, "AdamW learning rate", flag_values=fv)
    flags.DEFINE_integer("batch_size", MILConfig.batch_size, "slides per step", flag_values=fv)
    flags.DEFINE_integer("max_instances", MILConfig.max_instances, "tiles sampled per slide per step in training",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of folds, init and tile sampling", flag_values=fv)
    flags.DEFINE_bool("skip_unlabelled", False, "drop feature files without a label instead of failing",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)
    flags.DEFINE_string("heatmap", None, "write attention heatmap PNGs of a few slides to this folder",
                        flag_values=fv)
    flags.DEFINE_integer("heatmap_slides", 4, "how many slides get a heatmap", flag_values=fv)
    flags.DEFINE_string("slides", None, "slide folder or CSV for heatmap thumbnails (default: the h5's slide_path "
                        "attr)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__.split("\n\n")[0], required=("features", "labels"))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    labelled = feats.load_labelled_bags(args.features, feats.read_labels(args.labels),
                                        skip_unlabelled=args.skip_unlabelled)
    y, classes = feats.encode_labels([label for _, label in labelled])
    cfg = MILConfig(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
                    max_instances=args.max_instances, seed=args.seed)
    result = cross_validate([b.features for b, _ in labelled], y, len(classes), args.folds, cfg)
    print(f"ABMIL on {len(labelled)} slides, classes {classes}, D={labelled[0][0].features.shape[1]}")
    for f in result["folds"]:
        print(f"  fold {f['fold']}: n={f['n_test']}  auc {f['auc']:.3f}  balanced_acc {f['balanced_accuracy']:.3f}")
    s = result["summary"]
    print(f"  mean±std: auc {s['auc']['mean']:.3f}±{s['auc']['std']:.3f}  "
          f"balanced_acc {s['balanced_accuracy']['mean']:.3f}±{s['balanced_accuracy']['std']:.3f}")
    print(f"  pooled out-of-fold: auc {s['auc']['pooled']:.3f}  balanced_acc {s['balanced_accuracy']['pooled']:.3f}")
    if args.out:
        summary = {"classes": classes, "folds": result["folds"], "summary": s}
        pathlib.Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.heatmap:
        from xmag_jax.eval import heatmap

        for (bag, _), att in list(zip(labelled, result["attention"]))[: args.heatmap_slides]:
            path = heatmap.write_heatmap(bag, att, args.heatmap, slides=args.slides)
            print(f"  heatmap {path}")
    return 0
