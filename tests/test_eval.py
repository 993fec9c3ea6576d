"""Evaluation: linear probe / kNN, ABMIL, feature fidelity, and the errors on bad feature/label files."""

import json
import pathlib

import h5py
import numpy as np
import pytest

from xmag_jax import errors
from xmag_jax.eval import features as feats
from xmag_jax.eval import fidelity, mil, probe
from xmag_jax.formats import feature_h5


def write_bags(directory: pathlib.Path, bags: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for slide_id, x in bags.items():
        with h5py.File(directory / f"{slide_id}.h5", "w") as f:
            f["features"] = x.astype(np.float32)
            f["coords"] = np.stack([np.arange(len(x)) * 224, np.zeros(len(x))], 1).astype(np.int64)
            f.attrs["patch_size"] = 224
            f.attrs["patch_size_level0"] = 224


def write_labels(path: pathlib.Path, labels: dict[str, str]) -> pathlib.Path:
    path.write_text("slide_id,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    return path


def slide_dataset(tmp_path, *, shift: float, n_slides: int = 10, dim: int = 16, seed: int = 0):
    """Slides of two classes with unit-variance tiles whose class means are `shift` apart (0 = same distribution)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags, labels = {}, {}
    for i in range(n_slides):
        label = i % 2
        n = int(rng.integers(15, 30))
        bags[f"slide{i:02d}"] = rng.normal(size=(n, dim)) + (label - 0.5) * shift * direction
        labels[f"slide{i:02d}"] = ["benign", "tumor"][label]
    write_bags(tmp_path / "feats", bags)
    return tmp_path / "feats", write_labels(tmp_path / "labels.csv", labels)


def test_probe_separable_features_score_high(tmp_path):
    directory, labels_csv = slide_dataset(tmp_path, shift=6.0)
    tiles = probe.tiles_from_h5(directory, feats.read_labels(labels_csv))
    assert tiles.classes == ["benign", "tumor"] and tiles.x.shape[1] == 16
    result = probe.run_probe(tiles, n_folds=5, n_bootstrap=200)
    for method in ("linear", "knn"):
        est = result[method]["balanced_accuracy"]
        assert est.value > 0.9, (method, est)
        assert est.low <= est.value <= est.high
        assert result[method]["auc"].value > 0.95


def test_probe_random_labels_near_chance(tmp_path):
    directory, labels_csv = slide_dataset(tmp_path, shift=0.0, n_slides=16, seed=1)
    result = probe.run_probe(probe.tiles_from_h5(directory, feats.read_labels(labels_csv)), n_bootstrap=200)
    for method in ("linear", "knn"):
        est = result[method]["balanced_accuracy"]
        assert 0.3 < est.value < 0.7, (method, est)
        assert est.low < 0.5 < est.high or abs(est.value - 0.5) < 0.15


def test_probe_splits_keep_slides_whole(tmp_path):
    directory, labels_csv = slide_dataset(tmp_path, shift=1.0)
    tiles = probe.tiles_from_h5(directory, feats.read_labels(labels_csv))
    for train, test in probe.splits(tiles, 5, seed=0):
        assert not set(tiles.groups[train]) & set(tiles.groups[test])


def test_probe_cli_compares_feature_sets(tmp_path):
    good, labels_csv = slide_dataset(tmp_path / "a", shift=6.0)
    bad, _ = slide_dataset(tmp_path / "b", shift=0.0)
    out = tmp_path / "probe.json"
    rc = probe.main(["--features", f"good={good}", "--features", f"bad={bad}", "--labels", str(labels_csv),
                     "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    accuracy = {name: result[name]["linear"]["balanced_accuracy"]["value"] for name in ("good", "bad")}
    assert accuracy["good"] > accuracy["bad"]
    assert result["good"]["n_slides"] == 10


def test_probe_npz_input(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 8)) + y[:, None] * 2.0
    np.savez(tmp_path / "t.npz", features=x, labels=y, groups=np.arange(80) // 5)
    result = probe.run_probe(probe.tiles_from_npz(tmp_path / "t.npz"), n_bootstrap=50)
    assert result["linear"]["balanced_accuracy"].value > 0.9


def test_mismatched_feature_dims_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_bags(tmp_path / "feats", {"a": rng.normal(size=(5, 16)), "b": rng.normal(size=(5, 32))})
    with pytest.raises(feature_h5.FeatureFileError, match=r"b\.h5: feature dim 32 differs from 16"):
        feats.load_labelled_bags(tmp_path / "feats", {"a": "x", "b": "y"})


def test_labels_missing_slides_are_listed(tmp_path):
    rng = np.random.default_rng(0)
    write_bags(tmp_path / "feats", {s: rng.normal(size=(3, 4)) for s in ("s1", "s2", "s3")})
    with pytest.raises(feats.LabelsError, match=r"no label for 2 slide\(s\).*\['s2', 's3'\]"):
        feats.load_labelled_bags(tmp_path / "feats", {"s1": "x"})
    with pytest.warns(UserWarning, match=r"s2"):
        bags = feats.load_labelled_bags(tmp_path / "feats", {"s1": "x", "s4": "y"}, skip_unlabelled=True)
    assert [b.slide_id for b, _ in bags] == ["s1"]


def test_labels_csv_errors(tmp_path):
    (tmp_path / "l.csv").write_text("slide,label\na,1\n")
    with pytest.raises(feats.LabelsError, match=r"l\.csv: missing column\(s\) \['slide_id'\]"):
        feats.read_labels(tmp_path / "l.csv")
    (tmp_path / "l.csv").write_text("slide_id,label\na,1\na,2\n")
    with pytest.raises(feats.LabelsError, match="labelled both"):
        feats.read_labels(tmp_path / "l.csv")


def test_empty_bags_are_skipped_with_warning(tmp_path):
    rng = np.random.default_rng(0)
    write_bags(tmp_path / "feats", {"full": rng.normal(size=(3, 4)), "empty": np.zeros((0, 4))})
    with pytest.warns(UserWarning, match=r"no tiles.*empty"):
        bags = feats.load_labelled_bags(tmp_path / "feats", {"full": "a", "empty": "b"})
    assert [b.slide_id for b, _ in bags] == ["full"]


def key_instance_bags(n_bags: int, rng: np.random.Generator, dim: int = 16):
    """Bags of background instances; positive bags also hold 1-3 'key' instances that decide the label."""
    key = np.zeros(dim)
    key[:4] = 3.0
    bags, y, is_key = [], [], []
    for i in range(n_bags):
        label = i % 2
        x = rng.normal(size=(int(rng.integers(20, 50)), dim))
        k = np.zeros(len(x), bool)
        if label:
            k[rng.choice(len(x), int(rng.integers(1, 4)), replace=False)] = True
            x[k] += key
        bags.append(x.astype(np.float32))
        y.append(label)
        is_key.append(k)
    return bags, np.array(y), is_key


def test_abmil_learns_key_instance_task_and_attends_to_keys():
    rng = np.random.default_rng(0)
    train_bags, train_y, _ = key_instance_bags(48, rng)
    test_bags, test_y, test_keys = key_instance_bags(20, rng)
    model = mil.train(train_bags, train_y, 2, mil.MILConfig(epochs=15, batch_size=4, learning_rate=1e-3))
    proba, attention = mil.predict(model, test_bags)
    from xmag_jax.eval import metrics

    assert metrics.macro_auc(test_y, proba) > 0.9
    assert metrics.balanced_accuracy(test_y, proba) > 0.8
    for a, k in zip(attention, test_keys):
        assert a.shape == k.shape and abs(a.sum() - 1) < 1e-4
        if k.any():
            assert a[k].mean() > a[~k].mean()


def test_abmil_padding_does_not_change_output():
    import jax.numpy as jnp
    from flax import nnx

    model = mil.GatedABMIL(8, 3, rngs=nnx.Rngs(0))
    model.eval()
    bag = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    x16, m16 = mil.pad_bags([bag])
    x64, m64 = np.zeros((1, 64, 8), np.float32), np.zeros((1, 64), bool)
    x64[0, :10], m64[0, :10] = bag, True
    l16, a16 = model(jnp.asarray(x16), jnp.asarray(m16))
    l64, a64 = model(jnp.asarray(x64), jnp.asarray(m64))
    np.testing.assert_allclose(l16, l64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a16[0, :10], a64[0, :10], rtol=1e-5, atol=1e-7)
    assert float(a64[0, 10:].sum()) == 0.0


def test_mil_cli_cross_validates(tmp_path):
    rng = np.random.default_rng(1)
    bags, y, _ = key_instance_bags(12, rng)
    write_bags(tmp_path / "feats", {f"s{i}": b for i, b in enumerate(bags)})
    labels = write_labels(tmp_path / "labels.csv", {f"s{i}": str(label) for i, label in enumerate(y)})
    out = tmp_path / "mil.json"
    assert mil.main(["--features", str(tmp_path / "feats"), "--labels", str(labels), "--folds", "3",
                     "--epochs", "2", "--out", str(out),
                     "--heatmap", str(tmp_path / "maps"), "--heatmap_slides", "2"]) == 0
    result = json.loads(out.read_text())
    assert len(result["folds"]) == 3 and sum(f["n_test"] for f in result["folds"]) == 12
    assert set(result["summary"]) == {"auc", "balanced_accuracy"}
    assert set(result["summary"]["auc"]) == {"mean", "std", "pooled"}
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["s0_attention.png", "s1_attention.png"]


def test_fidelity_linear_teacher_vs_independent_teacher():
    rng = np.random.default_rng(0)
    n, ds, dt = 240, 24, 40
    student_tiles = rng.normal(size=(n, 16, ds))
    student = student_tiles.mean(axis=1) @ rng.normal(size=(ds, ds))
    w = rng.normal(size=(ds, dt))
    linear = student_tiles @ w + 0.05 * rng.normal(size=(n, 16, dt))
    groups = np.arange(n) // 8
    good = fidelity.fidelity(student, linear, student_tiles=student_tiles, teacher_tokens=linear[..., :8],
                             groups=groups)
    assert good["global"]["r2"] > 0.95 and good["tile"]["r2"] > 0.95 and good["tokens"]["r2"] > 0.95
    assert good["global"]["cosine"] > 0.95 and good["tile"]["cosine"] > 0.95
    independent = fidelity.fidelity(student, rng.normal(size=(n, 16, dt)), student_tiles=student_tiles, groups=groups)
    for level in ("global", "tile"):
        assert abs(independent[level]["r2"]) < 0.1, independent[level]
        assert independent[level]["cosine"] < 0.2


def test_fidelity_cli_arrays(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(40, 8))
    np.savez(tmp_path / "a.npz", student=s, teacher_tiles=np.repeat((s @ rng.normal(size=(8, 6)))[:, None], 16, 1))
    assert fidelity.main(["--arrays", str(tmp_path / "a.npz"), "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["global"]["r2"] > 0.99
    np.savez(tmp_path / "b.npz", student=s)
    with pytest.raises(feats.EvalInputError, match=r"b\.npz: missing array\(s\) \['teacher_tiles'\]"):
        fidelity.load_arrays(tmp_path / "b.npz")


def test_fidelity_from_pair_shards(tmp_path):
    """Student/teacher features of real pair records: shapes, bad records skipped, tiles row-major."""
    from flax import nnx

    from xmag_jax import encoders, models
    from xmag_jax.data import pairs, synthetic_pairs
    from xmag_jax.models import checkpoint

    synthetic_pairs.write_pair_shards(tmp_path / "pairs", 6, num_shards=1, split="test", corrupt={3: "jpeg"})
    checkpoint.save_model(tmp_path / "student", models.create_model("vit_test", rngs=nnx.Rngs(0)), "vit_test")
    arrays_file = tmp_path / "arrays.npz"
    rc = fidelity.main(["--pairs", str(tmp_path / "pairs"), "--split", "test", "--batch", "8",
                        "--student_checkpoint", str(tmp_path / "student"), "--teacher", "vit_test_teacher",
                        "--random_teacher", "--save_arrays", str(arrays_file), "--out", str(tmp_path / "f.json")])
    assert rc == 0
    arrays = fidelity.load_arrays(arrays_file)
    assert arrays["student"].shape == (5, 64) and arrays["student_tiles"].shape == (5, 16, 64)
    assert arrays["teacher_tiles"].shape == (5, 16, 96) and arrays["teacher_tokens"].shape == (5, 16, 96)
    assert len(arrays["groups"]) == 5
    result = json.loads((tmp_path / "f.json").read_text())
    assert set(result) == {"global", "tile", "tokens"} and result["tokens"]["n"] == 5 * 16
    # tile k of the teacher array is the teacher's embedding of the 20x tile at row k // 4, column k % 4
    import grain

    from xmag_jax.formats import pair_records

    source = grain.sources.ArrayRecordDataSource(pair_records.shard_paths(tmp_path / "pairs", "test"))
    _, region = pairs.decode_images(source[0], 0)
    teacher = encoders.load_encoder(model="vit_test_teacher", random_init=True)
    emb, tokens = teacher.forward_with_tokens(pairs.cut_tiles(region))
    np.testing.assert_allclose(arrays["teacher_tiles"][0], np.asarray(emb), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(arrays["teacher_tokens"][0], np.asarray(tokens).mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from xmag_jax.eval.__main__ import main

    rng = np.random.default_rng(0)
    write_bags(tmp_path / "feats", {"a": rng.normal(size=(4, 8)), "b": rng.normal(size=(4, 8))})
    labels = write_labels(tmp_path / "labels.csv", {"a": "x"})
    with pytest.raises(SystemExit) as exit_:
        errors.run_cli(main, prog="python -m xmag_jax.eval probe",
                       argv=["probe", "--features", str(tmp_path / "feats"), "--labels", str(labels)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("python -m xmag_jax.eval probe: error: labels CSV has no label for 1")
    with pytest.raises(errors.UserError, match="unknown subcommand 'nonsense'"):
        main(["nonsense"])
