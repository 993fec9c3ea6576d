"""Orbax checkpoints with a real Grain iterator: keep-last-N, exact data position, corrupt-latest fallback."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmag_jax.distill.checkpointing import CORRUPT_DIR, Checkpointer


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).repeat().batch(4).to_iter_dataset())


def _state(step: int, sharding):
    return {"w": jax.device_put(jnp.arange(16.0) + step, sharding), "step": jnp.asarray(step, jnp.int32)}


def _abstract(sharding):
    return {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}


def _run(workdir, steps, every=2, keep=2):
    """Consume one batch per step, save on the interval; returns the batches that follow the last step."""
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    checkpointer = Checkpointer(workdir, every=every, keep=keep)
    iterator = _iterator()
    for step in range(1, steps + 1):
        next(iterator)
        checkpointer.save(step, _state(step, sharding), iterator, {"run": "test"}, force=step == steps)
    checkpointer.wait()
    checkpointer.close()
    return iterator


def test_keep_last_n_and_exact_data_position(tmp_path):
    _run(tmp_path, steps=7)
    checkpointer = Checkpointer(tmp_path, every=2, keep=2)
    assert checkpointer.all_steps() == [6, 7]  # interval steps 2, 4, 6 + the forced final 7; keep 2
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    iterator = _iterator()
    restored = checkpointer.restore_latest(_abstract(one_device), iterator)
    assert restored.step == 7 and restored.metadata["run"] == "test" and restored.metadata["step"] == 7
    np.testing.assert_array_equal(restored.state["w"], np.arange(16.0) + 7)
    assert restored.state["w"].sharding == one_device  # written from 8 devices, restored onto 1
    expected = _iterator()
    for _ in range(7):
        next(expected)
    for _ in range(3):
        np.testing.assert_array_equal(next(iterator), next(expected))


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    _run(tmp_path, steps=6)
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")  # truncate the array data of the latest step
    checkpointer = Checkpointer(tmp_path, every=2, keep=2)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    iterator = _iterator()
    restored = checkpointer.restore_latest(_abstract(sharding), iterator)
    assert restored.step == 4
    np.testing.assert_array_equal(restored.state["w"], np.arange(16.0) + 4)
    assert "checkpoint step 6" in caplog.text and "falling back" in caplog.text
    assert checkpointer.all_steps() == [4]
    assert [p.name.split("-")[0] for p in (tmp_path / CORRUPT_DIR).iterdir()] == ["6"]
    expected = _iterator()
    for _ in range(4):
        next(expected)
    np.testing.assert_array_equal(next(iterator), next(expected))
    # Step 6 can be written again by the resumed run.
    mesh_sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), jax.P("data"))
    assert checkpointer.save(6, _state(6, mesh_sharding), iterator, {}, force=True)
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 6]


def test_no_readable_checkpoint_leaves_iterator_untouched(tmp_path):
    _run(tmp_path, steps=2, every=2, keep=1)
    (tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json").unlink()
    checkpointer = Checkpointer(tmp_path, every=2, keep=1)
    iterator = _iterator()
    next(iterator)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert checkpointer.restore_latest(_abstract(sharding), iterator) is None
    expected = _iterator()
    next(expected)
    np.testing.assert_array_equal(next(iterator), next(expected))


def test_input_position_regroups_for_another_process_count(tmp_path):
    """Two processes x 2 pairs, 3 batches each -> one process x 4 pairs continues with the same records."""
    from configs import debug
    from xmag_jax.data import make_iterator
    from xmag_jax.data.synthetic_pairs import write_pair_shards
    from xmag_jax.distill.checkpointing import ProcessCountChangeError, regroup_iterator_state

    write_pair_shards(tmp_path, 10, num_shards=1)  # 12 + 4 records read: the stream crosses an epoch
    cfg = debug.get_config().data
    cfg.dir, cfg.augment.d4, cfg.augment.color, cfg.augment.hed = str(tmp_path), False, False, False
    two = [make_iterator(cfg, seed=1, batch_size=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        for it in two:
            next(it)
    saved = [it.get_state() for it in two]
    following = np.concatenate([next(it)["record_index"] for it in two])

    one = make_iterator(cfg, seed=1, batch_size=4, process_index=0, process_count=1)
    one.set_state(regroup_iterator_state(saved, 1))
    np.testing.assert_array_equal(np.sort(next(one)["record_index"]), np.sort(following))

    saved[1] = {**saved[1], "bad_records": 1}
    with pytest.raises(ProcessCountChangeError, match="bad records skipped"):
        regroup_iterator_state(saved, 1)
