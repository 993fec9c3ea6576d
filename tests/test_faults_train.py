"""Faults around a training run (issue 13): checkpoints changed in place, two trainers on one workdir,
SIGTERM/SIGINT, out-of-range config values, one-line errors, libtpu noise off TPU hosts."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmag_jax.distill.checkpointing import CORRUPT_DIR, Checkpointer, state_digests

REPO = Path(__file__).resolve().parents[1]


def _iterator():
    return iter(grain.MapDataset.range(1000).repeat().batch(4).to_iter_dataset())


def _state(step: int, sharding):
    """64 KiB of incompressible float32 values, so Orbax stores them raw and an overwrite is not a decode error."""
    w = jax.random.normal(jax.random.key(step), (16384,), jnp.float32)
    return {"w": jax.device_put(w, sharding), "step": jnp.asarray(step, jnp.int32)}


def _abstract(sharding):
    return {"w": jax.ShapeDtypeStruct((16384,), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}


def _save_steps(workdir, steps, sharding):
    checkpointer = Checkpointer(workdir, every=1, keep=5)
    iterator = _iterator()
    for step in steps:
        next(iterator)
        checkpointer.save(step, _state(step, sharding), iterator, {}, force=True)
    checkpointer.wait()
    checkpointer.close()


def _overwrite_inside(step_dir: Path, size: int = 4096) -> Path:
    """Overwrite `size` bytes in the middle of the step's largest array file, keeping its length."""
    biggest = max((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
                  key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
    biggest.write_bytes(bytes(data))
    return biggest


def test_digest_is_the_same_under_any_sharding_and_sees_one_changed_element():
    mesh = jax.make_mesh((8,), ("data",))
    w = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    tree = {"w": w, "b": w.astype(jnp.bfloat16), "k": jax.random.key(1), "s": jnp.asarray(3, jnp.int32)}
    sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.P()))
    sharded["w"] = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.P("data")))
    assert state_digests(tree) == state_digests(sharded)
    changed = dict(tree, w=w.at[37, 5].add(1e-6))
    diff = {k for k, v in state_digests(changed).items() if v != state_digests(tree)[k]}
    assert diff == {"['w']"}


def test_checkpoint_changed_in_place_is_quarantined_and_the_previous_step_used(tmp_path, caplog):
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh_sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), jax.P("data"))
    _save_steps(tmp_path, [2, 4], mesh_sharding)
    _overwrite_inside(tmp_path / "checkpoints" / "4")
    checkpointer = Checkpointer(tmp_path, every=1, keep=5)
    iterator = _iterator()
    with caplog.at_level(logging.WARNING):
        restored = checkpointer.restore_latest(_abstract(one_device), iterator)
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["w"], _state(2, one_device)["w"])
    assert "checkpoint step 4" in caplog.text and "fails verification" in caplog.text
    assert "['w']" in caplog.text
    assert [p.name.split("-")[0] for p in (tmp_path / CORRUPT_DIR).iterdir()] == ["4"]
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
