"""Issue 13 faults in embedding, evaluation and pair reading: each test fails on the old behaviour."""

import json
import os
import pathlib
import re
import shutil

import h5py
import numpy as np
import pytest

from xmag_jax import errors
from xmag_jax.eval import features as feats
from xmag_jax.eval import fidelity, probe
from xmag_jax.formats import feature_h5


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
    with pytest.raises(feature_h5.FeatureFileError) as e:
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
    with pytest.raises(feature_h5.FeatureFileError, match=r"encoder=uni2_h:/w.*\(s6\.h5\)"):
        feats.load_labelled_bags(d, labels)
    _bag(d / "s6.h5", 5, 16, seed=6, weights_fingerprint="aaaa")
    with pytest.raises(feature_h5.FeatureFileError, match=r"weights_fingerprint=aaaa.*\(s6\.h5\)"):
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


# ---- embed: items 1, 4, 9, 13 ----------------------------------------------------------------------------------

MPP = 1.0  # µm/px: a 1 mm synthetic slide gives a 4x4 grid of 224 px tiles


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> pathlib.Path:
    from xmag_jax.wsi import synthetic

    d = tmp_path_factory.mktemp("slides")
    synthetic.write_dataset(str(d), 3, size_px=2048, seed=0)  # slide_000 .. slide_002
    return d


@pytest.fixture(scope="module")
def encoder():
    from xmag_jax import encoders

    return encoders.load_encoder(model="vit_test", random_init=True, seed=0)


def _specs(slides):
    from xmag_jax.wsi import inputs

    return inputs.list_slides(str(slides))


def _embed(slides, encoder, out, **kw):
    from xmag_jax.embed import plan, run

    return run.embed_slides(_specs(slides), encoder, out, plan.Tiling(MPP), batch=8, workers=1, progress=False,
                              **kw)


HOLD_LOCK = """
import sys
from xmag_jax import workdir_lock
with workdir_lock.hold(sys.argv[1], job="embed"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_embed_holds_the_out_lock(slides, encoder, tmp_path, capsys):
    import subprocess
    import sys

    from xmag_jax import workdir_lock
    from xmag_jax.embed import __main__ as embed_cli

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline() == "held\n"  # another embed job holds --out
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by embed .*pid {other.pid}"):
            _embed(slides, encoder, out)
        err = _cli(embed_cli.main, ["--slides", str(slides), "--out", str(out), "--model", "vit_test", "--random_init",
                                "--noprogress"], capsys)
        assert "in use by embed" in err and f"pid {other.pid}" in err
    finally:
        other.communicate("", timeout=60)
    assert not list(out.glob("*.h5"))
    assert sorted(_embed(slides, encoder, out).done) == ["slide_000", "slide_001", "slide_002"]
    assert not (out / workdir_lock.LOCK_NAME).exists()


def test_new_weights_at_the_same_path_are_not_taken_for_done(slides, encoder, tmp_path, capsys):
    from flax import nnx

    from xmag_jax import encoders, models
    from xmag_jax.embed import __main__ as embed_cli
    from xmag_jax.models import checkpoint

    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, models.create_model("vit_test", rngs=nnx.Rngs(1)), "vit_test")
    out = tmp_path / "out"
    argv = ["--slides", str(slides), "--out", str(out), "--checkpoint", str(ckpt), "--mpp", str(MPP), "--batch", "8",
            "--workers", "1", "--noprogress"]
    assert embed_cli.main(argv) == 0
    with h5py.File(out / "slide_000.h5", "r") as f:
        first = f["features"][...]
        fingerprints = f.attrs["weights_fingerprint"], f.attrs["preprocessing_fingerprint"]
    assert all(len(fp) == 16 for fp in fingerprints)
    assert fingerprints[0] == encoders.weights_fingerprint(encoders.load_encoder(checkpoint_dir=str(ckpt)))
    assert embed_cli.main(argv) == 0 and "0 embedded" in capsys.readouterr().out  # same weights: resume
    shutil.rmtree(ckpt)
    checkpoint.save_model(ckpt, models.create_model("vit_test", rngs=nnx.Rngs(2)), "vit_test")  # retrained
    err = _cli(embed_cli.main, argv, capsys)
    assert "slide_00" in err and "weights_fingerprint" in err and "use --overwrite" in err
    assert "preprocessing_fingerprint" not in err
    assert embed_cli.main([*argv, "--overwrite"]) == 0 and "3 embedded" in capsys.readouterr().out
    with h5py.File(out / "slide_000.h5", "r") as f:
        assert f.attrs["weights_fingerprint"] != fingerprints[0]
        assert f.attrs["preprocessing_fingerprint"] == fingerprints[1]
        assert not np.allclose(f["features"][...], first)
    # other preprocessing (here the tissue threshold) at the same µm/px is refused the same way
    err = _cli(embed_cli.main, [*argv, "--tissue_threshold", "0.5"], capsys)
    assert "preprocessing_fingerprint" in err and "weights_fingerprint" not in err


@pytest.mark.parametrize("argv, expected", [
    (["--slides", "{tmp}/missing"], "neither a folder of slides nor a CSV manifest"),
    (["--out", "{tmp}/file"], "is a file; expected a folder"),
    (["--mpp", "0"], "--mpp 0.0: expected a positive µm/px"),
    (["--mpp", "-2"], "--mpp -2.0: expected a positive µm/px"),
    (["--model", "vit_test", "--random_init", "--weights", "w.safetensors"], "exclude each other"),
])
def test_embed_bad_input_is_one_line_exit_2(slides, tmp_path, capsys, argv, expected):
    from xmag_jax.embed import __main__ as embed_cli

    (tmp_path / "file").write_text("")
    base = {"--slides": str(slides), "--out": str(tmp_path / "out")}
    args = [a.format(tmp=tmp_path) for a in argv]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    if "--model" not in args:
        args += ["--model", "vit_test", "--random_init"]
    assert expected in _cli(embed_cli.main, [*args, "--noprogress"], capsys)


def test_decoder_crash_in_the_reader_fails_that_slide_only(slides, encoder, tmp_path):
    import embed_fault_readers as readers

    from xmag_jax.wsi import failures

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"slide_001.*ReaderCrash.*died of SIGSEGV"):
        report = _embed(slides, encoder, out, read=readers.segfault_on_victim)
    assert sorted(report.done) == ["slide_000", "slide_002"] and report.failed == ["slide_001"]
    entries = [json.loads(line) for line in (out / failures.FAILURES_FILE).read_text().splitlines()]
    assert [(e["slide_id"], e["status"], e["error_type"]) for e in entries] == [("slide_001", "failed", "ReaderCrash")]
    assert set(entries[0]) >= {"slide", "slide_id", "status", "error_type", "message"}  # data_prep's record
    with h5py.File(out / "slide_002.h5", "r") as f, h5py.File(_reference(slides, encoder, tmp_path), "r") as ref:
        np.testing.assert_allclose(f["features"][...], ref["features"][...], rtol=1e-5, atol=1e-5)


def _reference(slides, encoder, tmp_path) -> pathlib.Path:
    ref = tmp_path / "ref"
    _embed(slides, encoder, ref, isolate=False)
    return ref / "slide_002.h5"


def test_reader_killed_from_outside_is_retried_without_blame(slides, encoder, tmp_path, monkeypatch):
    import embed_fault_readers as readers

    from xmag_jax.wsi import failures

    monkeypatch.setenv(readers.KILLS_ENV, str(tmp_path / "kills"))
    (tmp_path / "kills").mkdir()
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"died \(SIGKILL\), not of a decoder fault: reading the [23] unfinished"):
        report = _embed(slides, encoder, out, read=readers.killed_once_on_victim)
    assert len(list((tmp_path / "kills").iterdir())) == 1
    assert sorted(report.done) == ["slide_000", "slide_001", "slide_002"] and not report.failed
    assert (out / failures.FAILURES_FILE).read_text() == ""
    with h5py.File(out / "slide_002.h5", "r") as f, h5py.File(_reference(slides, encoder, tmp_path), "r") as ref:
        np.testing.assert_allclose(f["features"][...], ref["features"][...], rtol=1e-5, atol=1e-5)


def test_reader_killed_again_and_again_is_a_job_error(slides, encoder, tmp_path):
    import embed_fault_readers as readers

    from xmag_jax.wsi import failures, isolation

    out = tmp_path / "out"
    with pytest.raises(isolation.ReaderKilledError, match=r"killed 3 times in a row \(SIGKILL\).*out-of-memory"):
        with pytest.warns(UserWarning, match="SIGKILL"):
            _embed(slides, encoder, out, read=readers.always_killed_on_victim)
    assert (out / failures.FAILURES_FILE).read_text() == ""  # nothing blamed on a slide
