"""The teacher-target cache: format round trip, the writer (targets = the loss's, resume after a kill, the
lock, bad source records counted), the reader by (pair, state), and bad input (another config, truncated or
corrupted shards, a config the cache does not serve)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import debug
from xmag_jax import data, errors, sharding
from xmag_jax.data import augment, pairs
from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill import step
from xmag_jax.errors import ConfigError
from xmag_jax.teacher_cache import __main__ as cli
from xmag_jax.teacher_cache import reader, records, spec, writer

PAIRS, BAD = 6, 4  # record 4 has a garbled 20x JPEG


def make_config(data_dir, **loss):
    c = debug.get_config()
    c.data.dir = str(data_dir)
    c.data.augment.preset = "xmag"
    c.data.max_bad_record_fraction = 0.5
    c.batch_size = 8
    c.teacher.dtype = "float32"
    c.loss.projector_hidden = 32
    for k, v in loss.items():
        setattr(c.loss, k, v)
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    write_pair_shards(root / "pairs", PAIRS, num_shards=2, corrupt={BAD: "jpeg"})
    config = make_config(root / "pairs")
    summary = writer.write(config, str(root / "cache"), progress=False)
    return root, config, summary


def test_geometric_states_follow_the_augmentation():
    assert records.geometric_states(d4=False, flips_only=False) == (0,)
    assert records.geometric_states(d4=True, flips_only=False) == tuple(range(8))
    flips = records.geometric_states(d4=True, flips_only=True)
    assert sorted(flips) == sorted(augment.FLIPS_TO_D4.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_record_round_trip(dtype):
    codec = records.RecordCodec({"dtype": dtype, "embed_dim": 5, "token_grid": 4, "token_dim": 3})
    rng = np.random.default_rng(0)
    tiles, tokens = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(4, 4, 3)).astype(np.float32)
    rec = codec.decode(codec.encode(7, 6, tiles, tokens))
    assert (rec["record_index"], rec["d4"], rec["error"]) == (7, 6, "")
    tol = 0 if dtype == "float32" else 2.0**-8
    np.testing.assert_allclose(rec["tiles"], tiles, rtol=tol)
    np.testing.assert_allclose(rec["tokens"], tokens, rtol=tol)
    size = len(codec.encode(7, 6, tiles, tokens))
    assert size < (16 * 5 + 16 * 3) * (4 if dtype == "float32" else 2) + 120  # raw bytes, small framing


def test_cache_holds_the_losses_targets_for_every_pair_and_state(built):
    root, config, summary = built
    assert summary["pairs"] == PAIRS and summary["bad_pairs"] == 1 and summary["states"] == [0, 4, 6, 2]
    meta = records.read_metadata(root / "cache")
    assert meta["teacher"]["weights_fingerprint"] == spec.teacher_fingerprint(config)
    assert meta["targets"]["token_grid"] == 16 and meta["shard_lengths"] == [3, 3]
    info = json.loads((root / "cache" / "dataset_info.json").read_text())
    assert [int(n) for n in info["splits"][0]["shardLengths"]] == [12, 12]

    cache = reader.TargetCache(root / "cache")
    trainer = step.make_trainer(spec.live_config(config), sharding.make_mesh({"data": 1, "fsdp": 1},
                                                                             jax.devices()[:1]))
    teacher = trainer.teacher_state()
    source = pairs.PairSource(records.pair_records.shard_paths(root / "pairs", "train"))
    for index, d4 in [(0, 0), (2, 4), (5, 2)]:  # across both shards, several states
        _, image_20x = pairs.decode_images(source[index], index)
        tiles = pairs.cut_tiles(augment.apply_d4(image_20x, d4))[None]
        live = trainer.teacher_targets(teacher, tiles)
        got = cache.get(index, d4)
        np.testing.assert_allclose(got["tiles"], live.tiles[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["tokens"], live.tokens[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(cache.get(0, 0)["tiles"], cache.get(0, 4)["tiles"])  # states differ
    with pytest.raises(pairs.BadRecordError, match=rf"record {BAD}: bad when the cache was written.*image_20x"):
        cache.get(BAD, 0)
    with pytest.raises(pairs.BadRecordError, match="state d4=1 is not in the cache"):
        cache.get(0, 1)


def test_pipeline_serves_cached_targets_and_skips_the_bad_pair(built):
    root, config, _ = built
    c = make_config(root / "pairs")
    c.data.teacher_cache = str(root / "cache")
    meta = spec.check(c)
    assert meta["num_pairs"] == PAIRS
    batch = next(data.make_iterator(c.data, seed=0, batch_size=5, num_epochs=1, min_records_checked=1))
    assert set(batch) == {"image_5x", "target_tiles", "target_tokens", "record_index"}
    assert batch["target_tiles"].shape == (5, 1, 16, 96) and batch["target_tokens"].shape == (5, 1, 16, 16, 96)
    assert sorted(batch["record_index"]) == [i for i in range(PAIRS) if i != BAD]


def test_rerun_resumes_only_the_unfinished_shard(built, tmp_path):
    root, config, _ = built
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    shard0, shard1 = records.shard_paths(cache, "train", 2)
    before = os.stat(shard0).st_mtime_ns
    with open(shard1, "r+b") as f:  # killed mid-write: a truncated shard and a stale temp file
        f.truncate(1000)
    (cache / f"{os.path.basename(shard1)}.tmp-123-abcd").write_bytes(b"partial")
    with pytest.raises(pairs.ShardError,
                       match=f"{os.path.basename(shard1)}: teacher-target shard has|cannot be opened"):
        reader.TargetCache(cache)
    summary = writer.write(config, str(cache), progress=False)
    assert summary["pairs_written_now"] == 3 and os.stat(shard0).st_mtime_ns == before
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]
    np.testing.assert_array_equal(reader.TargetCache(cache).get(5, 6)["tiles"],
                                  reader.TargetCache(root / "cache").get(5, 6)["tiles"])


def test_corrupted_record_is_a_bad_record_named_with_its_shard(built, tmp_path):
    root, _, _ = built
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    shard1 = records.shard_paths(cache, "train", 2)[1]
    with open(shard1, "r+b") as f:  # garble the middle of the shard, leaving its footer and index intact
        f.seek(os.path.getsize(shard1) // 3)
        f.write(b"\x00" * 4096)
    got = reader.TargetCache(cache)
    reasons = []
    for index in range(3, PAIRS):
        for d4 in got.states:
            try:
                got.get(index, d4)
            except pairs.BadRecordError as e:
                reasons.append(str(e))
    corrupt = [r for r in reasons if "bad when the cache was written" not in r]
    assert corrupt and all(f"{shard1}: record" in r and "cannot be read" in r for r in corrupt), reasons


def test_cache_of_another_config_is_refused_naming_the_difference(built, tmp_path):
    root, config, _ = built
    c = make_config(root / "pairs")
    c.data.teacher_cache = str(root / "cache")
    c.seed = 5  # the random teacher's init follows the seed: other weights
    with pytest.raises(ConfigError, match="weights_fingerprint"):
        spec.check(c)
    c = make_config(root / "pairs")
    c.data.teacher_cache = str(root / "cache")
    c.data.augment.preset = "d4_color_hed"
    with pytest.raises(ConfigError, match=r"states \(D4 elements\) \[1, 3, 5, 7\] .* not cached"):
        spec.check(c)
    c.data.augment.preset, c.teacher.dtype = "xmag", "bfloat16"
    with pytest.raises(ConfigError, match="teacher dtype 'float32' in the cache, 'bfloat16'"):
        spec.check(c)
    other = tmp_path / "other_pairs"
    write_pair_shards(other, PAIRS + 1, num_shards=2)
    c = make_config(other)
    c.data.teacher_cache = str(root / "cache")
    with pytest.raises(ConfigError, match="source dataset"):
        spec.check(c)
    c.data.teacher_cache = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no such teacher-target cache"):
        spec.check(c)


def test_token_term_needs_cached_tokens(built, tmp_path, capsys):
    small = tmp_path / "pairs"
    write_pair_shards(small, 2, num_shards=1)
    writer.write(make_config(small, token_weight=0.0), str(tmp_path / "cache"), progress=False)
    c = make_config(small)
    c.data.teacher_cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="token term is on .* no token targets"):
        spec.check(c)
    argv = ["--config=configs/debug.py", f"--out={tmp_path / 'cache'}", f"--config.data.dir={small}",
            "--config.data.augment.preset=xmag", "--config.teacher.dtype=float32", "--config.batch_size=8",
            "--noprogress"]
    with pytest.raises(SystemExit) as exit_info:  # the writer will not mix a token-on cache into it
        errors.run_cli(cli.main, prog=cli.PROG, argv=argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "holds a teacher-target cache of another config (differs in targets)" in err


def test_fidelity_reads_the_teacher_features_from_the_cache(built):
    from flax import nnx

    from xmag_jax import encoders
    from xmag_jax.eval import pair_features

    root, config, _ = built
    trainer = step.make_trainer(spec.live_config(config), sharding.make_mesh({"data": 1, "fsdp": 1},
                                                                             jax.devices()[:1]))
    teacher = encoders.Encoder("teacher", trainer.teacher_arch,
                               nnx.merge(trainer.teacher_graphdef, trainer.teacher_state()))
    student = encoders.load_encoder(model="vit_test", random_init=True)
    source = pairs.PairSource(records.pair_records.shard_paths(root / "pairs", "train"))
    indices = np.arange(PAIRS)
    live = pair_features.pair_arrays(source, indices, student, teacher, 8, progress=False)
    cached = pair_features.pair_arrays(source, indices, student, None, 8, progress=False,
                                       cache=reader.TargetCache(root / "cache"))
    assert set(cached) == set(live) and len(live["groups"]) == PAIRS - 1  # the bad pair skipped by both
    for k in live:
        if k == "groups":
            np.testing.assert_array_equal(cached[k], live[k])
        else:
            np.testing.assert_allclose(cached[k], live[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("token_weight", [1.0, 0.0])
def test_cached_trainer_holds_no_teacher_and_counts_no_teacher_flops(token_weight):
    c = debug.get_config()
    c.loss.token_weight, c.data.views = token_weight, 2
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    live = step.make_trainer(c, mesh)
    c.data.teacher_cache = "CACHE"  # the trainer reads no cache; spec.check does, before it is built
    cached = step.make_trainer(c, mesh)
    assert cached.cached and cached.teacher_state() is None and cached.abstract_teacher_state() is None
    batch = cached.abstract_batch(4)
    expected = {"image_5x", "target_tiles"} | ({"target_tokens"} if token_weight else set())
    assert set(batch) == expected and batch["target_tiles"].shape == (4, 2, 16, 96)
    assert cached.flops_per_step().teacher_forward == 0 < live.flops_per_step().teacher_forward
    assert cached.flops_per_step().total == pytest.approx(live.flops_per_step().total
                                                          - live.flops_per_step().teacher_forward)
