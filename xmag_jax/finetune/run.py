"""k-fold end-to-end MIL fine-tuning with a frozen-feature baseline on the same folds and seeds.

Workdir layout:
  fold_K/checkpoints/STEP/   Orbax: trainable parameters + optimizer state (exact resume), meta JSON
  fold_K/metrics.jsonl, fold_K/tensorboard/   one line per step: loss, grad_norm
  fold_K/student/            the fine-tuned student (`models.checkpoint.save_model`: embed, convert export)
  fold_K/head/, head.json    the GatedABMIL weights (Orbax), its sizes, classes and input statistics
  fold_K/heatmaps/           attention over slide thumbnails of a few held-out slides
  fold_K/result.json         held-out probabilities of both methods (a finished fold is skipped on rerun)
  frozen_features.npz        the initial student's features of every slide (computed once; the frozen arm's
                             input and, with head.standardize, the source of the head-input statistics)
  results.json               per-fold AUC / balanced accuracy of both, means, pooled bootstrap CIs

Several JAX processes (multi-host): each reads and decodes only the tiles its devices hold (a step's and an
evaluation chunk's tile axis is split over the mesh's data axes, `distributed.process_slice`) and every process
computes the same replicated results; the checkpoints are written by all together, every other file by
process 0 alone. The workdir must be shared by the processes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from xmag_jax import atomic, sharding, workdir_lock
from xmag_jax.data import augment, distributed
from xmag_jax.distill.metrics import MetricWriter, NonFiniteLossError, check_finite, log_progress, to_floats
from xmag_jax.errors import ConfigError
from xmag_jax.eval import heatmap, metrics, mil
from xmag_jax.finetune import config as schema
from xmag_jax.finetune import data
from xmag_jax.finetune import model as model_lib
from xmag_jax.formats.feature_h5 import SlideBag
from xmag_jax.models import checkpoint

METHODS = ("end_to_end", "frozen")


@dataclasses.dataclass
class Setup:
    """What every fold shares."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    bags: data.Bags
    cohort: data.Cohort
    arch: Any
    mesh: jax.sharding.Mesh


def prepare(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> Setup:
    """Every input check (one-line UserError/ConfigError), before anything is compiled. The mesh spans
    `devices` (default: all)."""
    schema.check(config)
    bags = data.Bags(config.data.bags)
    cohort = data.read_cohort(config.data.labels, bags, config.data.folds, config.seed)
    arch = model_lib.read_init_arch(config)
    if not bags.patch_px or bags.patch_px % arch.vit.patch_size:
        raise ConfigError(f"data.bags {config.data.bags}: tiles of {bags.patch_px or 'mixed'} px, expected one "
                          f"size divisible by the student's patch size {arch.vit.patch_size} px")
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    n = sharding.data_parallel_size(mesh)
    micro = config.train.slides_per_step // config.train.grad_accum * config.train.tiles_per_slide
    if micro % n or config.eval.chunk_tiles % n:
        raise ConfigError(f"config.train: slides_per_step / grad_accum x tiles_per_slide = {micro} and "
                          f"config.eval.chunk_tiles={config.eval.chunk_tiles} must divide by the {n} data-parallel "
                          f"devices")
    model_lib.check_memory(config, arch, bags.patch_px, n)
    return Setup(config, pathlib.Path(workdir), bags, cohort, arch, mesh)


def _primary() -> bool:
    """Whether this process writes the run's files (process 0; checkpoints are written by all)."""
    return jax.process_index() == 0


def _write_json(path: pathlib.Path, obj: Any) -> None:
    if not _primary():
        return
    with atomic.target(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def slide_features(setup: Setup, fns: model_lib.Functions, states: tuple, slide_id: str) -> np.ndarray:
    """All tiles of a slide through the student in `eval.chunk_tiles` chunks: float32 `[N, D]` (every
    process reads its share of each chunk and gets all the features)."""
    chunk = setup.config.eval.chunk_tiles
    rows = distributed.process_slice(fns.chunk_sharding, (chunk, setup.bags.patch_px, setup.bags.patch_px, 3), 0)
    out = []
    for tiles, valid in data.slide_chunks(setup.bags, slide_id, chunk, rows):
        feats = fns.embed(*states, distributed.global_batch({"tiles": tiles}, fns.chunk_sharding)["tiles"])
        out.append(np.asarray(feats)[:valid])
    return np.concatenate(out)


InputStats = tuple[np.ndarray, np.ndarray]


def input_stats(feats: list[np.ndarray]) -> InputStats:
    """Per-dimension (mean, scale) `[D]` float32 of the tiles of `feats` (`[N_i, D]` per slide). The scale is
    floored at 1e-2 of the features' root mean square: a near-constant dimension (or student) is amplified
    at most 100x, not up to float32 noise."""
    x = np.concatenate(feats).astype(np.float64)
    floor = 1e-2 * np.sqrt(np.mean(x**2))
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), floor).astype(np.float32)


def standardize(feats: list[np.ndarray], stats: InputStats | None) -> list[np.ndarray]:
    return feats if stats is None else [(f - stats[0]) / stats[1] for f in feats]


def _fold_model(setup: Setup, fold: int, stats: InputStats | None = None):
    cfg = setup.config
    e2e = model_lib.build(cfg, setup.arch, len(setup.cohort.classes), seed=cfg.seed + fold)
    if stats is not None:
        e2e.set_input_stats(*stats)
    keep = model_lib.trainable_filter(setup.arch.vit.depth, cfg.model.freeze_blocks)
    return model_lib.split(e2e, keep)


def frozen_features(setup: Setup) -> dict[str, np.ndarray]:
    """The initial student's features of every cohort slide, cached in `frozen_features.npz`."""
    path = setup.workdir / "frozen_features.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    graphdef, trainable, frozen, rest = _fold_model(setup, 0)
    fns = model_lib.make_functions(graphdef, setup.arch, optax.identity(), setup.mesh)
    states = _replicate((trainable, frozen, rest), fns)
    feats = {s: slide_features(setup, fns, states, s) for s in setup.cohort.slide_ids}
    if _primary():
        with atomic.target(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **feats)
    return feats


def _host(tree: Any) -> Any:
    """Numpy copies of a tree's arrays (PRNG keys, which have none, kept as they are)."""
    return jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x), tree)


def _replicate(tree: Any, fns: model_lib.Functions) -> Any:
    """Host values (the same in every process) as arrays replicated over the whole mesh."""
    return jax.device_put(_host(tree), fns.replicated)


class _Checkpoints:
    """Orbax checkpoints of (trainable, opt_state) as flat leaves, plus a meta JSON."""

    def __init__(self, directory: pathlib.Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, tree: Any, meta: dict, force: bool = False) -> None:
        leaves = {str(i): x for i, x in enumerate(jax.tree.leaves(tree))}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                        meta=ocp.args.JsonSave({**meta, "step": step})), force=force)

    def restore_latest(self, tree: Any) -> tuple[int, Any] | None:
        leaves, treedef = jax.tree.flatten(tree)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for i, x in enumerate(leaves)}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as err:  # noqa: BLE001 - an unreadable step falls back to the previous one
                logging.warning("checkpoint step %d does not restore (%s: %s); trying the previous one",
                                step, type(err).__name__, err)
                continue
            return step, jax.tree.unflatten(treedef, [got["state"][str(i)] for i in range(len(leaves))])
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def train_fold(setup: Setup, fold: int, stats: InputStats | None = None
               ) -> tuple[Any, model_lib.Functions, tuple]:
    """Train (or resume) fold `fold` end to end, the head's input standardised with `stats` (None: raw);
    returns (graphdef, functions, final states)."""
    cfg = setup.config
    fold_dir = setup.workdir / f"fold_{fold}"
    train = np.flatnonzero(setup.cohort.fold != fold)
    sampler = data.Sampler(setup.bags, [setup.cohort.slide_ids[i] for i in train], setup.cohort.y[train],
                           slides_per_step=cfg.train.slides_per_step, tiles_per_slide=cfg.train.tiles_per_slide,
                           grad_accum=cfg.train.grad_accum,
                           options=augment.AugmentOptions.from_config(cfg.data.augment.to_dict()),
                           seed=cfg.seed, fold=fold)
    total = cfg.train.epochs * sampler.steps_per_epoch
    graphdef, trainable, frozen, rest = _fold_model(setup, fold, stats)
    tx = model_lib.optimizer(cfg, trainable, setup.arch.vit.depth, total)
    fns = model_lib.make_functions(graphdef, setup.arch, tx, setup.mesh)
    trainable, frozen, rest, opt_state = _replicate((trainable, frozen, rest, tx.init(trainable)), fns)
    ckpt = _Checkpoints(fold_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep)
    writer = MetricWriter(fold_dir)
    try:
        start = 0
        restored = ckpt.restore_latest((trainable, opt_state))
        if restored is not None:
            start, (trainable, opt_state) = restored
            logging.info("fold %d: resumed at step %d of %d", fold, start, total)
        writer.resume_at(start)
        base_key = jax.random.key(cfg.seed + fold)
        m = cfg.train.slides_per_step // cfg.train.grad_accum
        shape = (cfg.train.grad_accum, m * cfg.train.tiles_per_slide, setup.bags.patch_px, setup.bags.patch_px, 3)
        rows = distributed.process_slice(fns.batch_sharding, shape, 1)
        shardings = {"images": fns.batch_sharding, "mask": fns.replicated, "labels": fns.replicated}
        for step in range(start + 1, total + 1):
            b = sampler.batch(step, rows)  # not dataclasses.asdict: it deep-copies the image batch
            batch = distributed.global_batch({"images": b.images, "mask": b.mask, "labels": b.labels}, shardings)
            trainable, opt_state, out = fns.train_step(
                trainable, opt_state, frozen, rest, batch["images"], batch["mask"], batch["labels"],
                jax.random.fold_in(base_key, step))
            values = to_floats(out)
            check_finite(step, values)
            log_point = step % cfg.log_every == 0 or step == total
            writer.write(step, values, log_point=log_point)
            if log_point:
                log_progress(step, total, values)
            ckpt.save(step, (trainable, opt_state), {"fold": fold, "config": cfg.to_dict()}, force=step == total)
    except NonFiniteLossError as err:
        good = sorted(ckpt.manager.all_steps())
        raise NonFiniteLossError(f"fold {fold}: {err}; the last good checkpoint is step "
                                 f"{good[-1] if good else None} in {fold_dir / 'checkpoints'}") from err
    finally:
        ckpt.close()
        writer.close()
    return graphdef, fns, (trainable, frozen, rest)


def _save_outputs(setup: Setup, fold: int, e2e: model_lib.E2EModel, stats: InputStats | None) -> None:
    """The fine-tuned student and the head (with the statistics its input is standardised by), written by
    process 0 alone."""
    if not _primary():
        return
    fold_dir = setup.workdir / f"fold_{fold}"
    saved_vit = checkpoint.read_arch(setup.config.model.init).vit
    e2e.backbone.cfg = saved_vit  # the init's dtypes, no remat: what embed and convert export expect
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    checkpoint.save_model(fold_dir / "student", e2e.backbone, setup.arch.name, overwrite=True,
                          multiprocessing_options=alone)
    with atomic.target(fold_dir / "head", directory=True) as tmp, \
            ocp.StandardCheckpointer(multiprocessing_options=alone) as ck:
        ck.save(tmp / "params", nnx.to_pure_dict(nnx.state(e2e.head, nnx.Param)))
    _write_json(fold_dir / "head.json", {"in_dim": setup.arch.embed_dim, "classes": setup.cohort.classes,
                                         "hidden": setup.config.head.hidden, "attn_dim": setup.config.head.attn_dim,
                                         "module": "xmag_jax.eval.mil.GatedABMIL",
                                         "input_mean": None if stats is None else stats[0].tolist(),
                                         "input_scale": None if stats is None else stats[1].tolist()})


def run_fold(setup: Setup, fold: int, frozen_feats: dict[str, np.ndarray]) -> dict:
    """Both methods on fold `fold`; returns (and writes) the fold's held-out result. With head.standardize
    both heads see features standardised by the initial student's statistics over the fold's training tiles
    (`frozen_feats`)."""
    cfg, cohort = setup.config, setup.cohort
    result_path = setup.workdir / f"fold_{fold}" / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    train, test = np.flatnonzero(cohort.fold != fold), np.flatnonzero(cohort.fold == fold)
    test_ids = [cohort.slide_ids[i] for i in test]
    train_ids = [cohort.slide_ids[i] for i in train]
    stats = input_stats([frozen_feats[s] for s in train_ids]) if cfg.head.standardize else None
    graphdef, fns, states = train_fold(setup, fold, stats)
    e2e = nnx.merge(graphdef, *_host(states))  # host copies: the head and saves are local
    e2e.head.eval()
    feats = [slide_features(setup, fns, states, s) for s in test_ids]
    e2e_proba, attention = mil.predict(e2e.head, feats)
    for sid, f, att in list(zip(test_ids, feats, attention))[: cfg.heatmap_slides if _primary() else 0]:
        entry = setup.bags.slides[sid]
        bag = SlideBag(sid, pathlib.Path(setup.bags.directory), f, setup.bags.coords(sid),
                       {"slide_path": entry.path, "level0_mpp": entry.level0_mpp,
                        "patch_size_level0": entry.field_level0})
        heatmap.write_heatmap(bag, att, setup.workdir / f"fold_{fold}" / "heatmaps")
    _save_outputs(setup, fold, e2e, stats)
    result = {"fold": fold, "slides": test_ids, "y": cohort.y[test].tolist(),
              "end_to_end": e2e_proba.tolist()}
    if cfg.frozen.enabled:
        mil_cfg = mil.MILConfig(epochs=cfg.frozen.epochs, learning_rate=cfg.frozen.lr, hidden=cfg.head.hidden,
                                attn_dim=cfg.head.attn_dim, dropout=cfg.head.dropout,
                                max_instances=cfg.train.tiles_per_slide, seed=cfg.seed + fold)
        head = mil.train(standardize([frozen_feats[s] for s in train_ids], stats), cohort.y[train],
                         len(cohort.classes), mil_cfg)
        result["frozen"], _ = mil.predict(head, standardize([frozen_feats[s] for s in test_ids], stats))
        result["frozen"] = result["frozen"].tolist()
    for method in METHODS:
        if method in result:
            proba = np.asarray(result[method])
            result[f"{method}_metrics"] = {name: fn(cohort.y[test], proba) for name, fn in metrics.METRICS.items()}
    _write_json(result_path, result)
    return result


def summarize(results: list[dict], classes: list[str], seed: int) -> dict:
    """results.json: per method the per-fold AUC and balanced accuracy, their means, pooled bootstrap CIs."""
    out: dict[str, Any] = {"folds": len(results), "classes": classes}
    y = np.concatenate([r["y"] for r in results])
    for method in METHODS:
        if not all(method in r for r in results):
            continue
        auc = [r[f"{method}_metrics"]["auc"] for r in results]
        bacc = [r[f"{method}_metrics"]["balanced_accuracy"] for r in results]
        pooled = metrics.bootstrap(y, np.concatenate([r[method] for r in results]), seed=seed)
        out[method] = {"auc": auc, "auc_mean": float(np.nanmean(auc)), "auc_std": float(np.nanstd(auc)),
                       "balanced_acc": bacc, "balanced_acc_mean": float(np.mean(bacc)),
                       "balanced_acc_std": float(np.std(bacc)),
                       "pooled": {k: v.as_dict() for k, v in pooled.items()}}
    return out


def summary_line(summary: dict) -> str:
    parts = [f"{m}: auc {summary[m]['auc_mean']:.3f}±{summary[m]['auc_std']:.3f} balanced_acc "
             f"{summary[m]['balanced_acc_mean']:.3f}" for m in METHODS if m in summary]
    return f"finetune over {summary['folds']} folds: " + "; ".join(parts)


def run(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> dict:
    """Check everything, then every fold (finished folds skipped, an interrupted one resumed); results.json."""
    setup = prepare(config, workdir, devices)
    setup.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with workdir_lock.hold(setup.workdir, job="finetune", process_index=jax.process_index()):
        needed = config.frozen.enabled or config.head.standardize
        frozen_feats = frozen_features(setup) if needed else {}
        results = [run_fold(setup, k, frozen_feats) for k in range(setup.cohort.num_folds)]
        summary = summarize(results, setup.cohort.classes, config.seed)
        summary["seconds"] = round(time.time() - start, 1)
        _write_json(setup.workdir / "results.json", summary)
    setup.bags.close()
    logging.info("%s", summary_line(summary))
    return summary
