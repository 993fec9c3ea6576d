"""What a distillation config needs from a teacher-target cache, and the check that a cache provides it.

`expected_metadata(config, ...)` is the `metadata.json` the writer records for a config;
`check(config)` compares a finished cache with what `config` needs and raises `ConfigError` naming every
difference (teacher, its weights, dtype, dataset, missing states, tokens) before anything is compiled.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from xmag_jax import encoders, geometry, sharding
from xmag_jax.data import augment
from xmag_jax.distill import losses
from xmag_jax.errors import ConfigError
from xmag_jax.models import registry
from xmag_jax.teacher_cache import records


def live_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `data.teacher_cache` cleared: the live-teacher run the cache stands in for."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.teacher_cache = ""
    return config


def needed_states(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The D4 elements the config's `data.augment` draws (see `records.geometric_states`)."""
    options = augment.AugmentOptions.from_config(config.data.augment)
    return records.geometric_states(options.d4, options.flips_only)


def teacher_params_on_host(config: ml_collections.ConfigDict):
    """The teacher's parameters exactly as training builds them (`Trainer.teacher_state`: checkpoint or
    seeded random init, in `teacher.dtype`), on one CPU device, whatever accelerator the job has."""
    from xmag_jax.distill import step as step_lib  # the step imports the pipeline, which imports this package

    cpu_mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices("cpu")[:1])
    host = live_config(config)
    with host.unlocked():
        host.optim.grad_accum = 1
        host.batch_size = 1
    return step_lib.make_trainer(host, cpu_mesh).teacher_state()


def teacher_fingerprint(config: ml_collections.ConfigDict) -> str:
    """`encoders.params_fingerprint` of the config's teacher (read on the host; a few s for a ViT-g)."""
    return encoders.params_fingerprint(teacher_params_on_host(config))


def expected_metadata(config: ml_collections.ConfigDict, *, weights_fingerprint: str, dtype: str) -> dict[str, Any]:
    """`metadata.json` of a cache of `config`'s teacher targets stored in `dtype` (without the counts the
    writer adds: `num_pairs`, `bad_pairs`, `shard_lengths`)."""
    teacher = registry.get_arch(config.teacher.name)
    student = registry.get_arch(config.student.name)
    with_tokens = losses.LossWeights.from_config(config.loss).token > 0
    source = records.source_fingerprint(config.data.dir, config.data.split)
    return {
        "format_version": records.FORMAT_VERSION,
        "teacher": {"name": config.teacher.name, "dtype": config.teacher.dtype,
                    "weights_fingerprint": weights_fingerprint},
        "states": list(needed_states(config)),
        "targets": {"dtype": dtype, "embed_dim": teacher.embed_dim,
                    "token_grid": geometry.TILE_PX // student.vit.patch_size if with_tokens else None,
                    "token_dim": teacher.vit.embed_dim if with_tokens else None},
        "source": {"dir": os.path.abspath(config.data.dir), "split": config.data.split, **source},
    }


def differences(meta: dict[str, Any], config: ml_collections.ConfigDict, weights_fingerprint: str) -> list[str]:
    """What in the cache `meta` differs from what `config` needs; empty when the cache serves it."""
    want = expected_metadata(config, weights_fingerprint=weights_fingerprint, dtype="float32")
    found: list[str] = []
    for key in ("name", "dtype", "weights_fingerprint"):
        if meta["teacher"].get(key) != want["teacher"][key]:
            found.append(f"teacher {key} {meta['teacher'].get(key)!r} in the cache, {want['teacher'][key]!r} "
                         f"in the config")
    if meta["source"].get("split") != want["source"]["split"]:
        found.append(f"source split {meta['source'].get('split')!r} in the cache, data.split "
                     f"{want['source']['split']!r} in the config")
    elif meta["source"].get("fingerprint") != want["source"]["fingerprint"]:
        found.append(f"source dataset {meta['source'].get('dir')} (fingerprint {meta['source'].get('fingerprint')}) "
                     f"in the cache, data.dir {want['source']['dir']} (fingerprint {want['source']['fingerprint']}) "
                     "in the config")
    missing = [s for s in want["states"] if s not in meta["states"]]
    if missing:
        found.append(f"geometric states (D4 elements) {missing} of data.augment are not cached (the cache has "
                     f"{meta['states']})")
    grid, cached_grid = want["targets"]["token_grid"], meta["targets"].get("token_grid")
    if grid is not None and cached_grid is None:
        found.append("the token term is on (loss.token_weight > 0) but the cache has no token targets")
    elif grid is not None and cached_grid != grid:
        found.append(f"token targets pooled to {cached_grid}x{cached_grid} in the cache, the student grid is "
                     f"{grid}x{grid}")
    if meta["targets"].get("embed_dim") != want["targets"]["embed_dim"]:
        found.append(f"embedding width {meta['targets'].get('embed_dim')} in the cache, "
                     f"{want['targets']['embed_dim']} for teacher {config.teacher.name}")
    return found


def check(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The metadata of `config.data.teacher_cache` if it serves `config`; else ConfigError naming every
    difference. Logs what the cache changes against live distillation."""
    path = config.data.teacher_cache
    try:
        meta = records.read_metadata(path)
    except records.CacheError as e:
        raise ConfigError(f"data.teacher_cache: {e}") from None
    found = differences(meta, config, teacher_fingerprint(config))
    if found:
        raise ConfigError(f"data.teacher_cache: {path} does not match the config: " + "; ".join(found))
    options = augment.AugmentOptions.from_config(config.data.augment)
    if options.color or options.hed:
        logging.warning("data.teacher_cache: the cached targets are of the un-jittered 20x field; colour/HED "
                        "jitter now reaches the student's 5x tile only (live distillation jitters both unless "
                        "data.augment.student_only)")
    if config.teacher.sharding != "replicate":
        logging.info("data.teacher_cache: teacher.sharding=%r is ignored: the step has no teacher",
                     config.teacher.sharding)
    return meta
