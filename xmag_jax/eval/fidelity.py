"""Feature fidelity: how well a linear map of the student's 5x features predicts the teacher's 20x ones.

    python -m xmag_jax.eval fidelity --arrays fidelity.npz
    python -m xmag_jax.eval fidelity --pairs demo_out/pairs --split val \
        --student_checkpoint ckpt/student --teacher vit_test_teacher --teacher_weights teacher.safetensors
    python -m xmag_jax.eval fidelity --pairs demo_out/pairs --split val --student_checkpoint ckpt/student \
        --teacher_cache CACHE        # teacher features from a teacher-target cache of that split

Targets, both as in the distillation losses (`xmag_jax.distill.losses`):
- global: the teacher's mean embedding over the 16 20x tiles of a field `[N, Et]`, from the student's
  5x embedding `[N, Es]`;
- tile: the teacher's embedding of 20x tile k `[N·16, Et]`, from the student's tokens average-pooled to
  4x4 (block k) `[N·16, Ds]`;
- tokens: the teacher's patch tokens average-pooled to 4x4 (the mean token of 20x tile k) `[N·16, Dt]`,
  from the same student blocks.
A standardised ridge regression (alpha by internal CV) is fitted on k-1 folds of held-out pairs and scored
on the last: R² (variance-weighted over output dims) and the mean cosine similarity between predicted and
true teacher features; the cosine of the training-mean predictor is the baseline. Folds keep slides (or
at least the 16 tiles of a field) together.

Arrays npz: `student [N, Es]`, `teacher_tiles [N, 16, Et]`, optional `student_tiles [N, 16, Ds]`,
`teacher_tokens [N, 16, Dt]` and `groups [N]` (slide ids).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags
from sklearn import linear_model, metrics, model_selection, pipeline, preprocessing

from xmag_jax import cli
from xmag_jax.eval import features as feats

ALPHAS = np.logspace(-3, 4, 15)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of `[N, D]` arrays -> `[N]`."""
    num = (a * b).sum(axis=1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def linear_fidelity(x: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None, n_folds: int = 5,
                    seed: int = 0) -> dict:
    """Cross-validated ridge `x [N, Dx] -> y [N, Dy]`: held-out R², mean cosine, and the mean-predictor cosine."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise feats.EvalInputError(f"expected x [N, Dx] and y [N, Dy] with one N, got {x.shape} and {y.shape}")
    if groups is not None and len(np.unique(groups)) >= 2:
        cv = model_selection.GroupKFold(min(n_folds, len(np.unique(groups))))
        folds = list(cv.split(x, y, groups))
    else:
        if len(x) < 4:
            raise feats.EvalInputError(f"need at least 4 samples for cross-validated fidelity, got {len(x)}")
        folds = list(model_selection.KFold(min(n_folds, len(x) // 2), shuffle=True, random_state=seed).split(x))
    pred, base = np.zeros_like(y), np.zeros_like(y)
    for train, test in folds:
        reg = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.RidgeCV(alphas=ALPHAS))
        pred[test] = reg.fit(x[train], y[train]).predict(x[test])
        base[test] = y[train].mean(axis=0)
    return {
        "n": int(len(x)),
        "folds": len(folds),
        "r2": float(metrics.r2_score(y, pred, multioutput="variance_weighted")),
        "cosine": float(cosine(pred, y).mean()),
        "cosine_mean_baseline": float(cosine(base, y).mean()),
    }


def fidelity(student: np.ndarray, teacher_tiles: np.ndarray, *, student_tiles: np.ndarray | None = None,
             teacher_tokens: np.ndarray | None = None, groups: np.ndarray | None = None, n_folds: int = 5,
             seed: int = 0) -> dict:
    """Global fidelity of `teacher_tiles [N, 16, Et]`; given `student_tiles [N, 16, Ds]`, also tile-level
    (and token-level with `teacher_tokens [N, 16, Dt]`), with the 16 blocks of a field kept in one fold."""
    if teacher_tiles.ndim != 3 or len(teacher_tiles) != len(student):
        raise feats.EvalInputError(
            f"teacher_tiles must be [N, 16, Et] with N={len(student)}, got {teacher_tiles.shape}")
    out = {"global": linear_fidelity(student, teacher_tiles.mean(axis=1), groups=groups, n_folds=n_folds, seed=seed)}
    if student_tiles is None:
        return out
    k = teacher_tiles.shape[1]
    field = np.repeat(np.arange(len(student)) if groups is None else np.asarray(groups), k)
    x = student_tiles.reshape(-1, student_tiles.shape[-1])
    for level, target in (("tile", teacher_tiles), ("tokens", teacher_tokens)):
        if target is None:
            continue
        if student_tiles.shape[:2] != target.shape[:2]:
            raise feats.EvalInputError(f"student_tiles {student_tiles.shape} and teacher {level} {target.shape} "
                             "disagree on [N, 16]")
        out[level] = linear_fidelity(x, target.reshape(-1, target.shape[-1]), groups=field, n_folds=n_folds, seed=seed)
    return out


def load_arrays(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """`student`, `teacher_tiles` and optional `student_tiles`, `teacher_tokens`, `groups` from an npz."""
    return feats.npz_arrays(path, ("student", "teacher_tiles"), ("student_tiles", "teacher_tokens", "groups"))


PROG = "python -m xmag_jax.eval fidelity"


def _define(fv: flags.FlagValues) -> None:
    def string(name: str, help_: str, default: str | None = None) -> None:
        flags.DEFINE_string(name, default, help_, flag_values=fv)

    string("arrays", "npz with student [N, Es], teacher_tiles [N, 16, Et], ...")
    string("pairs", "directory of tile-pair ArrayRecord shards (data_prep)")
    string("split", "shard split of --pairs (held-out slides: data_prep writes `val`)", "val")
    flags.DEFINE_integer("max_pairs", 2048, "random subsample of the split's pairs", flag_values=fv)
    flags.DEFINE_integer("batch", 16, "pairs per forward batch", flag_values=fv)
    string("student_checkpoint", "student model checkpoint (models.checkpoint)")
    string("student_timm_dir", "student as a timm local dir (config.json + model.safetensors)")
    string("teacher_checkpoint", "teacher model checkpoint (models.checkpoint)")
    string("teacher_timm_dir", "teacher as a timm local dir")
    string("teacher", "teacher registry name (with --teacher_weights, or --random_teacher)")
    string("teacher_weights", "teacher weights file for --teacher")
    flags.DEFINE_bool("random_teacher", False, "allow a random-init teacher (debug only)", flag_values=fv)
    string("teacher_cache", "read the teacher's features from this teacher-target cache of the same --pairs split "
           "(`python -m xmag_jax.teacher_cache`) instead of running a teacher")
    string("save_arrays", "also save the computed arrays to this npz")
    flags.DEFINE_integer("folds", 5, "cross-validation folds of the ridge fit (slides kept whole)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the pair subsample and the folds", flag_values=fv)
    string("out", "write the results as JSON here")


COMMAND = cli.Command(PROG, _define, doc=__doc__.split("\n\n")[0], one_of=(("arrays", "pairs"),))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if args.arrays:
        arrays = load_arrays(args.arrays)
    else:
        from xmag_jax.eval import pair_features

        arrays = pair_features.from_args(args)
        if args.save_arrays:
            np.savez(args.save_arrays, **arrays)
    result = fidelity(arrays["student"], arrays["teacher_tiles"], student_tiles=arrays.get("student_tiles"),
                      teacher_tokens=arrays.get("teacher_tokens"), groups=arrays.get("groups"), n_folds=args.folds,
                      seed=args.seed)
    for level, r in result.items():
        print(f"{level:6s} n={r['n']:6d}  R² {r['r2']:.3f}  cosine {r['cosine']:.3f}  "
              f"(mean-predictor cosine {r['cosine_mean_baseline']:.3f}, {r['folds']} folds)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
