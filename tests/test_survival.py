"""Survival: Cox loss vs lifelines / numpy, tokens contract, neighbours, bad input (one line, exit 2), resume."""

import json

import h5py
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from configs import celleconet_debug
from data_prep import synthetic_survival as ss
from xmag_jax import errors
from xmag_jax.formats import feature_h5
from xmag_jax.survival import __main__ as cli
from xmag_jax.survival import batching, cox, cv
from xmag_jax.survival import model as model_lib
from xmag_jax.survival import slides as slides_lib


def _breslow_nll(risk, time, event):
    """Direct formula: -1/E sum over events of risk_i - log sum_{t_j >= t_i} exp(risk_j)."""
    terms = [risk[i] - np.log(np.exp(risk[time >= time[i]]).sum()) for i in range(len(time)) if event[i]]
    return -np.sum(terms) / len(terms)


def test_cox_nll_matches_breslow_formula_with_ties_and_ignores_padding():
    rng = np.random.default_rng(0)
    time = np.array([5, 3, 3, 8, 1, 3, 8, 2.0])
    event = np.array([1, 1, 1, 0, 1, 0, 1, 1])
    risk = rng.normal(size=8)
    valid = np.ones(8, bool)
    got = cox.cox_nll(jnp.asarray(risk), jnp.asarray(time), jnp.asarray(event), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), _breslow_nll(risk, time, event), rtol=1e-5)
    padded = [np.concatenate([a, b]) for a, b in ((risk, [9.0, -9.0]), (time, [0.5, 9.0]), (event, [1, 1]))]
    got_padded = cox.cox_nll(*(jnp.asarray(a) for a in padded), jnp.asarray(np.r_[valid, False, False]))
    np.testing.assert_allclose(float(got_padded), float(got), rtol=1e-6)


def test_cox_nll_is_lifelines_partial_likelihood_without_ties():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    time = rng.exponential(np.exp(-0.8 * x)) + rng.uniform(0, 1e-3, 60)  # distinct times: Efron == Breslow
    event = (rng.uniform(size=60) < 0.7).astype(int)
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": time, "e": event}), "t", "e")
    beta = cph.params_["x"]
    nll = cox.cox_nll(jnp.asarray(beta * x), jnp.asarray(time), jnp.asarray(event), jnp.ones(60, bool))
    np.testing.assert_allclose(-float(nll) * event.sum(), cph.log_likelihood_, rtol=1e-4)


def test_binary_within_leaves_out_censored_before_t():
    label, known = cox.binary_within(jnp.array([10.0, 70, 30, 80]), jnp.array([1, 1, 0, 0]), 60.0)
    assert label.tolist() == [True, False, False, False]
    assert known.tolist() == [True, True, False, True]


def test_pool_tokens_adaptive_average():
    patches = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
    np.testing.assert_allclose(feature_h5.pool_tokens(patches, 3)[:, 1, 2], patches[:, 2:4, 4:6].mean(axis=(1, 2)))
    pooled = feature_h5.pool_tokens(patches, 4)  # 6 -> 4: cells [0:2], [1:3], [3:5], [4:6]
    np.testing.assert_allclose(pooled[:, 2, 1], patches[:, 3:5, 1:3].mean(axis=(1, 2)))
    assert feature_h5.pool_tokens(patches, 1).shape == (2, 1, 1, 3)


def test_grid_neighbours_with_a_missing_tile():
    stride = 896
    coords = np.array([(0, 0), (1, 0), (0, 1), (2, 2)]) * stride + 100
    nb = slides_lib.grid_neighbours(coords, stride)
    assert nb[0].tolist() == [0, -1, -1, -1, -1, 1, -1, 2, -1]  # self, right (1), below (2)
    assert nb[3].tolist() == [3] + [-1] * 8


def _cohort(tmp_path, n=24, cohort="spatial", words=1, tokens_=False, **kw):
    slides, rows = ss.make_cohort(n, cohort, seed=3, words=words, min_side=3, max_side=4, **kw)
    ss.write_features(tmp_path / "features", slides, dim=8, words=words, tokens=tokens_)
    ss.write_clinical(tmp_path, rows, slides)
    return tmp_path / "features", tmp_path / "clinical.csv", rows


def test_tokens_become_words_and_the_spatial_model_is_permutation_and_translation_invariant(tmp_path):
    features, csv_path, rows = _cohort(tmp_path, n=2, words=2, tokens_=True)
    with h5py.File(features / "slide_000.h5") as f:
        t = f["tokens"]
        assert t.dtype == np.float16 and t.shape[1:] == (2, 2, 8)
        assert t.attrs["token_grid"] == 2 and t.attrs["um_per_word"] == pytest.approx(224 * 2.0 / 2)
    (slide, _), _ = slides_lib.load_slides(features, ["slide_000", "slide_001"])
    assert slide.words.shape == (slide.n_tiles, 4, 8)
    config = celleconet_debug.get_config()
    net = model_lib.build("spatial", 8, 4, 8, 1, config, seed=0)
    net.eval()
    perm = np.random.default_rng(0).permutation(slide.n_tiles)
    inverse = np.argsort(perm)
    shuffled = slides_lib.Slide("p", slide.features[perm], slide.words[perm], slide.centres_um[perm] + 5000.0,
                                np.where(slide.neighbours[perm] >= 0, inverse[slide.neighbours[perm]], -1))
    outs = []
    for s in (slide, shuffled):
        b = batching.make_batch([s], np.ones(1), np.ones(1), batch_size=2, global_attention_max_tiles=256)
        outs.append(float(net({k: jnp.asarray(b[k]) for k in ("features", "words", "neighbours", "centres", "mask",
                                                                "local")})[0, 0]))
    assert np.isfinite(outs[0]) and outs[0] == pytest.approx(outs[1], abs=1e-4)


def _write_h5(path, n, *, encoder="enc", mpp=2.0, dim=8):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((n, dim), np.float32))
        c = f.create_dataset("coords", data=np.arange(2 * n).reshape(n, 2) * 896)
        for k, v in {"encoder": encoder, "mpp": mpp, "patch_size": 224, "patch_size_level0": 896}.items():
            f.attrs[k] = v
            c.attrs[k] = v


def test_mixed_encoders_and_pixel_sizes_are_refused_naming_files_and_one_tile_is_fine(tmp_path):
    _write_h5(tmp_path / "a.h5", 1)
    _write_h5(tmp_path / "b.h5", 3)
    (one, _), _ = slides_lib.load_slides(tmp_path, ["a", "b"])
    assert one.n_tiles == 1 and one.neighbours.tolist() == [[0] + [-1] * 8]
    _write_h5(tmp_path / "c.h5", 3, encoder="other")
    with pytest.raises(slides_lib.SlideDataError, match=r"encoder.*c\.h5"):
        slides_lib.load_slides(tmp_path, ["a", "b", "c"])
    _write_h5(tmp_path / "c.h5", 3, mpp=0.5)
    with pytest.raises(slides_lib.SlideDataError, match=r"mpp.*c\.h5"):
        slides_lib.load_slides(tmp_path, ["a", "c"])
    with pytest.raises(slides_lib.SlideDataError, match=r"no feature file.*\['x', 'y'\]"):
        slides_lib.load_slides(tmp_path, ["a", "x", "y"])


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        errors.run_cli(cli.main, prog=cli.PROG, argv=argv)
    return exit_.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("row, message", [
    ("s9,-1,1,60,2", "time -1.0 is negative"),
    ("s9,,1,60,2", "time '' is missing"),
    ("s9,12,2,60,2", "event '2'"),
])
def test_bad_clinical_rows_are_one_line_errors(tmp_path, capsys, row, message):
    features, csv_path, _ = _cohort(tmp_path, n=4)
    csv_path.write_text("slide_id,time,event,age,stage\nslide_000,3,1,60,1\n" + row + "\n")
    code, err = _run(["--config", "configs/celleconet_debug.py", "--workdir", str(tmp_path / "run"),
                      f"--config.data.features={features}", f"--config.data.clinical={csv_path}"], capsys)
    assert code == 2 and message in err and ":3:" in err and "\n" not in err


def test_missing_features_and_too_few_events_are_one_line_errors(tmp_path, capsys):
    features, csv_path, rows = _cohort(tmp_path, n=6)
    base = ["--config", "configs/celleconet_debug.py", "--workdir", str(tmp_path / "run"),
            f"--config.data.features={features}"]
    extra = tmp_path / "extra.csv"
    extra.write_text(csv_path.read_text() + "ghost_1,5,1,60,2\n")
    code, err = _run([*base, f"--config.data.clinical={extra}"], capsys)
    assert code == 2 and "no feature file" in err and "ghost_1" in err
    few = tmp_path / "few.csv"
    few.write_text("slide_id,time,event,age,stage\n" + "".join(
        f"{r['slide_id']},{r['time']},{int(i < 2)},60,2\n" for i, r in enumerate(rows)))
    code, err = _run([*base, f"--config.data.clinical={few}"], capsys)
    assert code == 2 and "not enough events for 3 folds" in err
    assert not (tmp_path / "run").exists()  # refused before the workdir (and any compile)


def test_cli_writes_results_and_resumes_only_unfinished_units(tmp_path, capsys):
    features, csv_path, _ = _cohort(tmp_path, n=24)
    argv = ["--config", "configs/celleconet_debug.py", "--workdir", str(tmp_path / "run"),
            f"--config.data.features={features}", f"--config.data.clinical={csv_path}",
            "--config.folds=2", "--config.train.epochs=1", "--config.model.dim=8", "--config.abmil.hidden=8",
            "--config.abmil.attn_dim=4", "--config.transformer_no_pos.dim=8", "--config.loss.binary_months=60"]
    assert cli.main(argv) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["folds"] == 2 and set(results["models"]) == set(cv.MODELS)
    for m in results["models"].values():
        assert len(m["folds"]) == 2 and 0 <= m["c_index_mean"] <= 1
        assert {"c_index", "auc", "hazard_ratio", "hr_ci95", "logrank_p"} <= set(m["folds"][0])
        assert (run / m["km_plot"]).read_bytes()[:4] == b"\x89PNG"
        assert set(m["subgroups"]["stage"]) <= {"stage=1", "stage=2", "stage=3"}
    assert (run / "checkpoints" / "fold1_spatial").is_dir()
    before = {p.name: p.read_text() for p in (run / "units").glob("*.json")}
    (run / "units" / "fold1_abmil.json").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 7 and "fold 1 abmil: test C-index" in out
    after = {p.name: p.read_text() for p in (run / "units").glob("*.json")}
    assert {k: v for k, v in after.items() if k != "fold1_abmil.json"} == {
        k: v for k, v in before.items() if k != "fold1_abmil.json"}
    code, err = _run([*argv, "--config.seed=1"], capsys)
    assert code == 2 and "another config" in err


def test_slides_writer_renders_the_class_map_with_data_prep_synthetic(tmp_path):
    import tiffslide

    slides, _ = ss.make_cohort(1, "spatial", seed=0, min_side=2, max_side=2)
    ss.write_slides(tmp_path, slides)
    with tiffslide.TiffSlide(tmp_path / "slide_000.tif") as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(ss.LEVEL0_MPP)
        assert slide.dimensions == (1792, 1792)  # 2 tiles x 448 µm at 0.5 µm/px


def test_local_attention_is_a_mask_by_um_distance(tmp_path):
    features, _, _ = _cohort(tmp_path, n=1)
    (slide,), _ = slides_lib.load_slides(features, ["slide_000"])
    config = celleconet_debug.get_config()
    b = batching.make_batch([slide], np.ones(1), np.ones(1), batch_size=1, global_attention_max_tiles=1)
    assert b["local"].tolist() == [True]
    keys = ("features", "words", "neighbours", "centres", "mask")
    outs = {}
    for window in (1e9, 500.0):  # everything in reach vs the 4 nearest tiles (448 µm apart)
        config.model.window_um = window
        net = model_lib.build("spatial", 8, 1, 8, 1, config, seed=0)
        net.eval()
        for local in (True, False):
            batch = {k: jnp.asarray(b[k]) for k in keys} | {"local": jnp.asarray([local])}
            outs[window, local] = float(net(batch)[0, 0])
    assert outs[1e9, True] == pytest.approx(outs[1e9, False], abs=1e-5)
    assert outs[500.0, True] != pytest.approx(outs[500.0, False], abs=1e-3)
    assert outs[500.0, False] == pytest.approx(outs[1e9, False], abs=1e-5)


def test_real_size_config_builds_every_model_and_scores_a_slide(tmp_path):
    from xmag_jax.survival import config as celleconet  # the real size is the schema's default

    features, _, _ = _cohort(tmp_path, n=1)
    (slide,), _ = slides_lib.load_slides(features, ["slide_000"])
    config = celleconet.base_config()
    with pytest.raises(errors.ConfigError, match="data.features"):  # the real config needs its data paths
        cv.check_config(config)
    b = batching.make_batch([slide], np.ones(1), np.ones(1), batch_size=1,
                            global_attention_max_tiles=config.model.global_attention_max_tiles)
    for name in model_lib.NEURAL:
        net = model_lib.build(name, 8, 1, 8, 1, config, seed=0)
        net.eval()
        out = net({k: jnp.asarray(v) for k, v in b.items() if k not in ("time", "event", "valid")})
        assert out.shape == (1, 1) and np.isfinite(np.asarray(out)).all()
