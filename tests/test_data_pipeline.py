"""The Grain pipeline on real ArrayRecord pair shards: contents, order, sharding, resume, bad records."""

import copy

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.debug import get_config
from xmag_jax.data import (
    TooManyBadRecordsError,
    build_dataset,
    global_batch,
    iterator_restore_args,
    iterator_save_args,
    make_iterator,
)
from xmag_jax.data.synthetic_pairs import tile_colour, write_pair_shards

NUM_RECORDS = 24
BAD = {2: "jpeg", 9: "size", 17: "proto"}


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    write_pair_shards(out, NUM_RECORDS, num_shards=2)
    return str(out)


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs_corrupt")
    write_pair_shards(out, NUM_RECORDS, num_shards=3, corrupt=BAD)
    return str(out)


def _data(directory, *, d4=False, color=False, hed=False, workers=0, max_bad=0.01, views=1):
    data = copy.deepcopy(get_config().data)
    data.dir = directory
    data.views = views
    data.worker_count = workers
    data.max_bad_record_fraction = max_bad
    data.augment.d4, data.augment.color, data.augment.hed = d4, color, hed
    return data


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _tile_means(batch, view=0):
    """[B, 16, 3] mean colour of each 20x tile and [B, 16, 3] of the 5x block under it, in `view`."""
    tiles = batch["tiles_20x"][:, view].astype(float).mean(axis=(2, 3))
    b = len(batch["image_5x"])
    blocks = batch["image_5x"][:, view].astype(float).reshape(b, 4, 56, 4, 56, 3).mean(axis=(2, 4))
    return tiles, blocks.reshape(b, 16, 3)


def test_batches_hold_the_records_they_name(clean_dir):
    it = make_iterator(_data(clean_dir), seed=0, batch_size=4, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image_5x"].shape == (4, 1, 224, 224, 3) and batch["image_5x"].dtype == np.uint8
    assert batch["tiles_20x"].shape == (4, 1, 16, 224, 224, 3) and batch["tiles_20x"].dtype == np.uint8
    assert batch["record_index"].shape == (4,) and batch["record_index"].dtype == np.int64
    assert sorted(batch) == ["image_5x", "record_index", "tiles_20x"]
    tiles, blocks = _tile_means(batch)
    for i, index in enumerate(batch["record_index"]):
        expected = np.stack([tile_colour(int(index), k) for k in range(16)])
        assert np.abs(tiles[i] - expected).max() < 4, f"record {index}: tiles out of order"
        assert np.abs(blocks[i] - expected).max() < 4, f"record {index}: 5x image not the same field"


def test_augmented_pairs_stay_aligned(clean_dir):
    it = make_iterator(_data(clean_dir, d4=True, color=True, hed=True), seed=1, batch_size=4,
                       process_index=0, process_count=1)
    moved = 0
    for batch in _take(it, 2):
        tiles, blocks = _tile_means(batch)
        # Same D4 and colour draw on both magnifications: block k of the 5x tile matches 20x tile k.
        assert np.abs(tiles - blocks).max() < 6
        for i, index in enumerate(batch["record_index"]):
            expected = np.stack([tile_colour(int(index), k) for k in range(16)]).astype(float)
            moved += int(np.abs(tiles[i] - expected).max() > 20)
    assert moved > 0, "no field was rotated or recoloured"


def test_views_are_independent_draws_each_shared_by_both_magnifications(clean_dir):
    """Two views: each aligned (one draw on the 5x tile and its 20x field), the two views drawn differently,
    view 0 the one-view pipeline's draw, and the same views again from the same seed and position."""
    kwargs = dict(seed=4, batch_size=4, process_index=0, process_count=1)
    data = _data(clean_dir, d4=True, color=True, hed=True, views=2)
    two = _take(make_iterator(data, **kwargs), 2)
    one = _take(make_iterator(_data(clean_dir, d4=True, color=True, hed=True), **kwargs), 2)
    _assert_batches_equal(two, _take(make_iterator(data, **kwargs), 2))
    for batch, single in zip(two, one):
        assert batch["image_5x"].shape == (4, 2, 224, 224, 3) and batch["tiles_20x"].shape == (4, 2, 16, 224, 224, 3)
        for view in range(2):
            tiles, blocks = _tile_means(batch, view)
            assert np.abs(tiles - blocks).max() < 6
        for key in ("image_5x", "tiles_20x"):
            np.testing.assert_array_equal(batch[key][:, :1], single[key], err_msg=key)
            assert all(not np.array_equal(pair[0], pair[1]) for pair in batch[key]), key
    with pytest.raises(ValueError, match="data.views must be >= 1"):
        build_dataset(_data(clean_dir, views=0), seed=0, batch_size=2, process_index=0, process_count=1)


def test_same_seed_same_batches_other_seed_other_order(clean_dir):
    data = _data(clean_dir, d4=True, color=True, hed=True)
    kwargs = dict(batch_size=3, process_index=0, process_count=1)
    first = _take(make_iterator(data, seed=7, **kwargs), 2)
    _assert_batches_equal(first, _take(make_iterator(data, seed=7, **kwargs), 2))
    other = _take(make_iterator(data, seed=8, **kwargs), 2)
    assert not all(np.array_equal(a["record_index"], b["record_index"]) for a, b in zip(first, other))


def test_epochs_cover_every_record_and_reshuffle(clean_dir):
    it = make_iterator(_data(clean_dir), seed=0, batch_size=6, process_index=0, process_count=1, num_epochs=2)
    epochs = [np.concatenate([b["record_index"] for b in _take(it, 4)]) for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(NUM_RECORDS))
    assert epochs[0].tolist() != epochs[1].tolist()
    with pytest.raises(StopIteration):
        next(it)


def test_processes_read_disjoint_complete_slices(clean_dir):
    seen = []
    for process_index in range(2):
        it = make_iterator(_data(clean_dir), seed=3, batch_size=4, process_index=process_index,
                           process_count=2, num_epochs=1)
        seen.append([int(i) for b in _take(it, 3) for i in b["record_index"]])
        with pytest.raises(StopIteration):
            next(it)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_RECORDS))


def test_augmentation_draws_follow_the_global_stream_not_the_process(clean_dir):
    """Two processes' augmented pairs interleave into exactly the one-process stream: draws are per pair,
    not per local position (which would repeat the same draw on every host)."""
    kwargs = dict(seed=7, batch_size=1, num_epochs=1)
    data = _data(clean_dir, d4=True, color=True, hed=True)
    single = _take(make_iterator(data, process_index=0, process_count=1, **kwargs), 8)
    per_process = [_take(make_iterator(data, process_index=i, process_count=2, **kwargs), 4) for i in range(2)]
    interleaved = [per_process[i % 2][i // 2] for i in range(8)]
    _assert_batches_equal(single, interleaved)


def test_get_state_set_state_resumes_exactly(clean_dir):
    data = _data(clean_dir, d4=True, color=True)
    kwargs = dict(seed=5, batch_size=4, process_index=0, process_count=1)
    it = make_iterator(data, **kwargs)
    _take(it, 7)  # past the first epoch (6 batches)
    state = it.get_state()
    following = _take(it, 2)
    resumed = make_iterator(data, **kwargs)
    resumed.set_state(state)
    _assert_batches_equal(following, _take(resumed, 2))


def test_orbax_checkpoint_with_a_prefetch_worker_resumes_exactly(clean_dir, tmp_path):
    data = _data(clean_dir, d4=True, workers=1)
    kwargs = dict(seed=2, batch_size=2, process_index=0, process_count=1)
    it = make_iterator(data, **kwargs)
    seen = _take(it, 2)
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True))
    manager.save(2, args=ocp.args.Composite(data=iterator_save_args(it), meta=ocp.args.JsonSave({"step": 2})))
    following = _take(it, 2)  # advancing right after save() must not change what was saved
    manager.wait_until_finished()
    it.close()

    resumed = make_iterator(data, **kwargs)
    restored = manager.restore(2, args=ocp.args.Composite(data=iterator_restore_args(resumed),
                                                          meta=ocp.args.JsonRestore()))
    assert restored["data"] is resumed and restored["meta"] == {"step": 2}
    _assert_batches_equal(following, _take(resumed, 2))
    resumed.close()
    assert all(type(v) is np.ndarray for b in seen + following for v in b.values())


def test_bad_records_are_skipped_and_counted(corrupt_dir):
    it = make_iterator(_data(corrupt_dir, max_bad=0.5), seed=0, batch_size=3, process_index=0, process_count=1,
                       min_records_checked=1)
    first_epoch = _take(it, 7)  # the 21 good records of the first epoch come first
    seen = sorted(int(i) for b in first_epoch for i in b["record_index"])
    assert seen == sorted(set(range(NUM_RECORDS)) - set(BAD))
    _take(it, 1)  # one batch into the second epoch: every bad record of the first epoch was passed
    assert it.bad_records >= len(BAD)
    assert it.records_seen == 8 * 3 + it.bad_records
    assert it.get_state()["bad_records"] == it.bad_records


def test_too_many_bad_records_is_a_clear_error(corrupt_dir):
    it = make_iterator(_data(corrupt_dir, max_bad=0.05), seed=0, batch_size=3, process_index=0, process_count=1,
                       min_records_checked=1)
    with pytest.raises(TooManyBadRecordsError, match=r"failed to decode, more than data.max_bad_record_fraction=0.05"
                       r"; the latest: record (2|9|17)"):
        _take(it, 10)


def test_a_data_set_without_good_records_fails_instead_of_hanging(tmp_path):
    write_pair_shards(tmp_path, 6, num_shards=1, corrupt={i: "size" for i in range(6)})
    it = make_iterator(_data(str(tmp_path), max_bad=0.5), seed=0, batch_size=2, process_index=0, process_count=1,
                       max_bad_in_a_row=20)
    with pytest.raises(TooManyBadRecordsError, match=r"20 records in a row failed to decode; the latest: record \d: "
                       r"field 'image_20x': image is 896x800x3, expected 896x896x3"):
        next(it)


def test_bad_records_tolerated_until_enough_are_seen(corrupt_dir):
    it = make_iterator(_data(corrupt_dir, max_bad=0.05), seed=0, batch_size=3, process_index=0, process_count=1,
                       min_records_checked=10_000)
    _take(it, 8)
    assert it.bad_records >= len(BAD)


def test_config_errors_are_named(clean_dir, tmp_path):
    data = _data(clean_dir)
    data.colour = True
    with pytest.raises(ValueError, match="colour"):
        build_dataset(data, seed=0, batch_size=2, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no shards"):
        build_dataset(_data(str(tmp_path)), seed=0, batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        build_dataset(_data(clean_dir), seed=0, batch_size=16, process_index=0, process_count=2)


def test_global_batch_shards_the_batch_over_the_data_axes():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    local = {
        "image_5x": np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3),
        "record_index": np.arange(8, dtype=np.int64) * 10,
    }
    arrays = global_batch(local, sharding)
    for key, value in local.items():
        assert arrays[key].shape == value.shape and arrays[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
        assert {s.data.shape[0] for s in arrays[key].addressable_shards} == {1}
