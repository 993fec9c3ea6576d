"""Issue 13 faults in embedding, evaluation and pair reading: each test fails on the old behaviour."""

import json
import os
import pathlib
import re
import shutil
import signal

import h5py
import numpy as np
import pytest

from xmag_jax import errors
from xmag_jax.eval import features as feats
from xmag_jax.eval import fidelity, mil, probe


def _cli(main, argv, capsys) -> str:
    """Runs `main(argv)` as the command line does; returns its one stderr line (the exit must be 2)."""
    with pytest.raises(SystemExit) as exit_:
        errors.run_cli(main, prog="prog", argv=argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _bag(path: pathlib.Path, n: int, dim: int, *, seed: int, encoder="vit_s:/ckpt", mpp=2.0, patch=224, **attrs):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rng.normal(size=(n, dim)).astype(np.float32))
        c = f.create_dataset("coords", data=np.arange(2 * n, dtype=np.int64).reshape(n, 2))
        for k, v in dict(encoder=encoder, mpp=mpp, patch_size=patch, **attrs).items():
            f.attrs[k] = c.attrs[k] = v


# ---- item 6: mixed encoders / µm/px in one feature folder --------------------------------------------------


def test_eval_refuses_features_of_mixed_encoders_and_mpp(tmp_path, capsys):
    d = tmp_path / "feats"
    d.mkdir()
    labels = {}
    for i in range(8):  # same feature dim throughout: the old dim check saw nothing wrong
        _bag(d / f"s{i}.h5", 5, 16, seed=i, mpp=0.5 if i >= 6 else 2.0)
        labels[f"s{i}"] = "ab"[i % 2]
    with pytest.raises(feats.FeatureFileError) as e:
        feats.load_labelled_bags(d, labels)
    message = str(e.value)
    assert "2 different encoders/tilings" in message and "6 file(s) with encoder=vit_s:/ckpt, mpp=2.0" in message
    assert "s0.h5, s1.h5, s2.h5 and 3 more" in message and "2 file(s)" in message and "(s6.h5, s7.h5)" in message
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    err = _cli(probe.main, ["--features", str(d), "--labels", str(tmp_path / "labels.csv")], capsys)
    assert "mpp=0.5" in err and "s6.h5" in err
    # another encoder, or other weights at the same path (a different fingerprint), is refused the same way
    _bag(d / "s6.h5", 5, 16, seed=6, encoder="uni2_h:/w")
    _bag(d / "s7.h5", 5, 16, seed=7)
    with pytest.raises(feats.FeatureFileError, match=r"encoder=uni2_h:/w.*\(s6\.h5\)"):
        feats.load_labelled_bags(d, labels)
    _bag(d / "s6.h5", 5, 16, seed=6, weights_fingerprint="aaaa")
    with pytest.raises(feats.FeatureFileError, match=r"weights_fingerprint=aaaa.*\(s6\.h5\)"):
        feats.load_labelled_bags(d, labels)
    _bag(d / "s6.h5", 5, 16, seed=6)
    assert len(feats.load_labelled_bags(d, labels)) == 8


# ---- item 13: eval bad input is one line and exit 2; a BOM labels CSV works ---------------------------------


def test_eval_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from xmag_jax.eval.__main__ import main

    d = tmp_path / "feats"
    d.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,a\n")
    assert "no *.h5 feature files in" in _cli(main, ["probe", "--features", str(d), "--labels", str(labels)], capsys)
    assert "does not exist" in _cli(main, ["mil", "--features", str(tmp_path / "nope"), "--labels", str(labels)],
                                    capsys)
    _bag(d / "s0.h5", 5, 8, seed=0)
    assert "labels CSV" in _cli(main, ["mil", "--features", str(d), "--labels", str(tmp_path / "x.csv")], capsys)
    (tmp_path / "bad.csv").write_text("slide,diagnosis\ns0,a\n")
    assert "missing column(s)" in _cli(main, ["probe", "--features", str(d), "--labels", str(tmp_path / "bad.csv")],
                                       capsys)
    assert "need at least two classes" in _cli(main, ["probe", "--features", str(d), "--labels", str(labels)], capsys)
    np.savez(tmp_path / "a.npz", student=np.zeros((4, 8)))
    assert "missing array(s) ['teacher_tiles']" in _cli(main, ["fidelity", "--arrays", str(tmp_path / "a.npz")], capsys)
    assert "not a readable npz" in _cli(main, ["fidelity", "--arrays", str(tmp_path / "none.npz")], capsys)
    assert "no shards for split" in _cli(main, ["fidelity", "--pairs", str(d)], capsys)


def test_labels_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("slide_id,label\ns0,tumour\ns1,normal\n".encode("utf-8-sig"))
    assert feats.read_labels(path) == {"s0": "tumour", "s1": "normal"}


# ---- item 15: eval flags have help and defaults ---------------------------------------------------------------


@pytest.mark.parametrize("module, flags", [(probe, ["--folds", "--C", "--knn-k"]),
                                           (mil, ["--folds", "--epochs", "--lr"]), (fidelity, ["--folds"])])
def test_eval_help_shows_defaults(module, flags, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:")[1]
    for flag in flags:
        help_text = re.search(rf" {re.escape(flag)} [A-Z_]+ (.*?)(?= -|$)", options).group(1)
        assert re.search(r"\w+ .*\(default: [^)]+\)$", help_text), (flag, help_text)


# ---- item 7: a corrupt or truncated pair shard -----------------------------------------------------------------


def _pairs(tmp_path, n=12):
    from xmag_jax.data.synthetic_pairs import write_pair_shards

    return write_pair_shards(tmp_path / "pairs", n, num_shards=2)


def _overwrite_middle(path: str) -> None:
    """Zeroes 2 kB in the middle of the shard: one record's chunk is corrupt, the index at the end intact."""
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2: len(data) // 2 + 2000] = bytes(2000)
    pathlib.Path(path).write_bytes(data)


def test_record_unreadable_in_a_shard_is_a_counted_bad_record(tmp_path):
    import copy

    from configs.debug import get_config
    from xmag_jax.data import TooManyBadRecordsError, make_iterator, pairs

    paths = _pairs(tmp_path)
    _overwrite_middle(paths[0])
    source = pairs.PairSource(paths)
    unreadable = [i for i in range(len(source)) if isinstance(source[i], pairs.UnreadableRecord)]
    assert len(unreadable) == 1 and unreadable[0] < 6
    with pytest.raises(pairs.BadRecordError, match=rf"record {unreadable[0]}: .*00000-of-00002: record \d cannot be "
                       r"read \(Corrupted Riegeli"):
        pairs.decode_images(source[unreadable[0]], unreadable[0])
    data = copy.deepcopy(get_config().data)
    data.dir, data.worker_count, data.max_bad_record_fraction = str(tmp_path / "pairs"), 0, 0.2
    data.augment.d4 = data.augment.color = data.augment.hed = False
    it = make_iterator(data, seed=0, batch_size=2, process_index=0, process_count=1, num_epochs=1,
                       min_records_checked=1)
    batches = list(it)
    assert it.bad_records == 1 and len(batches) == 5
    assert unreadable[0] not in {int(i) for b in batches for i in b["record_index"]}
    data.max_bad_record_fraction = 0.01
    with pytest.raises(TooManyBadRecordsError, match=r"the latest: record \d: .*00000-of-00002: record \d cannot"):
        list(make_iterator(data, seed=0, batch_size=2, process_index=0, process_count=1, num_epochs=1,
                           min_records_checked=1))


def test_truncated_shard_stops_with_the_file_named(tmp_path, capsys):
    from xmag_jax.data import build_dataset, pairs

    paths = _pairs(tmp_path)
    pathlib.Path(paths[1]).write_bytes(pathlib.Path(paths[1]).read_bytes()[:100_000])
    with pytest.raises(pairs.ShardError, match=rf"^{re.escape(paths[1])}: pair shard cannot be opened.*re-run "
                       r"`python -m data_prep.tile_pairs`"):
        pairs.PairSource(paths)
    import copy

    from configs.debug import get_config

    data = copy.deepcopy(get_config().data)
    data.dir, data.worker_count = str(tmp_path / "pairs"), 0
    with pytest.raises(pairs.ShardError, match="00001-of-00002: pair shard cannot be opened"):
        build_dataset(data, seed=0, batch_size=2, process_index=0, process_count=1)
    err = _cli(fidelity.main, ["--pairs", str(tmp_path / "pairs"), "--split", "train"], capsys)
    assert "00001-of-00002: pair shard cannot be opened" in err
