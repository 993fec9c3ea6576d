"""Slide embedding: TRIDENT-layout h5 per slide, resume, failure manifest, empty slides, CLI."""

import json
import pathlib

import h5py
import numpy as np
import pytest
import tifffile

from xmag_jax import encoders
from xmag_jax.embed import __main__ as cli
from xmag_jax.embed import run as embed_run
from xmag_jax.embed.plan import Tiling
from xmag_jax.eval import features as feats
from xmag_jax.formats import feature_h5
from xmag_jax.wsi import failures, inputs, slide_reader, synthetic, tissue

MPP = 1.0  # µm/px: a 1 mm synthetic slide gives a 4x4 grid of 224 px tiles


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("slides")
    synthetic.write_dataset(str(d), 2, size_px=4096, seed=0)  # slide_000.svs (40x), slide_001.tif (20x)
    (d / "broken.svs").write_bytes((d / "slide_000.svs").read_bytes()[:300_000])  # truncated: tile data missing
    white = np.full((1024, 1024, 3), 255, np.uint8)
    tifffile.imwrite(d / "blank.tif", white, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm/px glass, no tissue
    return d


@pytest.fixture(scope="module")
def encoder() -> encoders.Encoder:
    return encoders.load_encoder(model="vit_test", random_init=True, seed=0)


@pytest.fixture(scope="module")
def run(slides, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    specs = inputs.list_slides(str(slides))
    with pytest.warns(UserWarning) as record:
        report = embed_run.embed_slides(specs, encoder, out, Tiling(MPP), batch=8, workers=2, progress=False)
    return out, report, [str(w.message) for w in record]


def test_report_counts_done_empty_failed(run):
    _, report, messages = run
    assert sorted(report.done) == ["blank", "slide_000", "slide_001"], (report, messages)
    assert report.failed == ["broken"] and report.empty == ["blank"], report
    assert any("blank" in m and "empty h5" in m for m in messages)
    assert any("broken" in m and "RegionReadError" in m for m in messages)


def test_h5_layout_and_coords(run, slides, encoder):
    out, report, _ = run
    for slide_id, path in (("slide_000", "slide_000.svs"), ("slide_001", "slide_001.tif")):
        with h5py.File(out / f"{slide_id}.h5", "r") as f:
            features, coords = f["features"][...], f["coords"][...]
            attrs = dict(f["coords"].attrs)
            assert {k: v for k, v in f.attrs.items() if k != feature_h5.VERSION_ATTR} == attrs  # + version
        assert features.dtype == np.float32 and features.shape == (report.tiles[slide_id], encoder.embed_dim)
        assert coords.dtype == np.int64 and coords.shape == (len(features), 2) and len(coords) > 4
        with slide_reader.open_slide(slides / path) as slide:
            field = round(224 * MPP / slide.mpp)
            assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == field
            assert attrs["mpp"] == MPP and attrs["target_magnification"] == 10.0
            assert attrs["level0_mpp"] == slide.mpp and attrs["name"] == slide_id
            assert attrs["encoder"] == encoder.name
            # the same grid xmag_jax.wsi.tissue gives, and each feature is the forward of the tile at its coords
            _, mask, ds = tissue.slide_mask(slide)
            np.testing.assert_array_equal(coords, tissue.tile_grid(slide.dimensions, field, mask, ds, 0.25).coords)
            assert (coords % field == 0).all() and (coords + field <= np.array(slide.dimensions)).all()
            picks = [0, len(coords) - 1]
            tiles = np.stack([slide_reader.read_field(slide, *coords[i], field, 224) for i in picks])
        batch = np.zeros((8, 224, 224, 3), np.uint8)
        batch[: len(tiles)] = tiles
        direct = np.asarray(encoder.forward(batch))[: len(tiles)]
        np.testing.assert_allclose(features[picks], direct, rtol=1e-4, atol=1e-4)


def test_empty_slide_gives_empty_h5(run, encoder):
    out, _, _ = run
    with h5py.File(out / "blank.h5", "r") as f:
        assert f["features"].shape == (0, encoder.embed_dim) and f["coords"].shape == (0, 2)


def test_failure_manifest(run):
    out, _, _ = run
    entries = [json.loads(line) for line in (out / failures.FAILURES_FILE).read_text().splitlines()]
    assert [e["slide_id"] for e in entries] == ["broken"]
    assert entries[0]["error_type"] == "RegionReadError" and entries[0]["slide"].endswith("broken.svs")
    assert entries[0]["status"] == "failed" and "broken.svs" in entries[0]["message"]
    assert not list(out.glob("*.tmp*")) and not (out / "broken.h5").exists()


def test_embed_and_data_prep_write_the_same_failure_line(run, slides, tmp_path):
    from data_prep import tile_bags, tile_pairs

    spec = next(s for s in inputs.list_slides(str(slides)) if s.slide_id == "broken")
    config = tile_bags.BagConfig(mpp=MPP, progress=False)
    tile_bags.process_slide(spec, config, str(tmp_path / "work"), None)
    tile_pairs.collect_results([spec], config, str(tmp_path), str(tmp_path / "work"))
    (embedded,) = [json.loads(line) for line in (run[0] / failures.FAILURES_FILE).read_text().splitlines()]
    (prepared,) = [json.loads(line) for line in (tmp_path / failures.FAILURES_FILE).read_text().splitlines()]
    assert set(embedded) == set(prepared) == {"slide", "slide_id", "status", "error_type", "message", "time"}
    assert [embedded[k] for k in ("slide", "slide_id", "status", "error_type")] == [
        prepared[k] for k in ("slide", "slide_id", "status", "error_type")] == [
        spec.path, "broken", "failed", "RegionReadError"]
    assert failures.Failure.from_record(prepared).record() == prepared


def test_features_readable_by_eval(run):
    out, _, _ = run
    labelled = feats.load_labelled_bags(out, {"slide_000": "a", "slide_001": "b"}, skip_unlabelled=True)
    assert [b.slide_id for b, _ in labelled] == ["slide_000", "slide_001"]


def test_resume_skips_done_slides(run, slides, encoder):
    out, _, _ = run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    with pytest.warns(UserWarning, match="broken"):
        again = embed_run.embed_slides(inputs.list_slides(str(slides)), encoder, out, Tiling(MPP), batch=8,
                                   progress=False)
    assert sorted(again.skipped) == ["blank", "slide_000", "slide_001"] and again.done == []
    assert again.failed == ["broken"]  # failed slides are retried
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    other = encoders.load_encoder(model="vit_test", random_init=True, seed=1)
    with pytest.raises(embed_run.StaleFeaturesError, match="use --overwrite"):
        embed_run.embed_slides(inputs.list_slides(str(slides)), other, out, Tiling(MPP), progress=False)


def test_cli_teacher_from_csv_manifest(slides, tmp_path):
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,slide_id\n{slides / 'slide_001.tif'},s1\n")
    out = tmp_path / "teacher"
    rc = cli.main(["--slides", str(manifest), "--out", str(out), "--model", "vit_test_teacher", "--random_init",
                     "--mpp", "2.0", "--batch", "8", "--noprogress"])
    assert rc == 0
    with h5py.File(out / "s1.h5", "r") as f:
        assert f["features"].shape[1] == 96 and f.attrs["target_magnification"] == 5.0
        assert f.attrs["encoder"] == "vit_test_teacher:random-init-seed0"


def test_encoder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        encoders.load_encoder(model="vit_test", checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs --weights"):
        encoders.load_encoder(model="vit_test")


def test_encoder_sources_agree(tmp_path):
    """A checkpoint, its timm local-dir export and its safetensors under --model give the same features."""
    from flax import nnx

    from xmag_jax import models
    from xmag_jax.convert import timm_io
    from xmag_jax.models import checkpoint

    model = models.create_model("vit_test", rngs=nnx.Rngs(3))
    checkpoint.save_model(tmp_path / "ckpt", model, "vit_test")
    timm_io.export_timm(tmp_path / "ckpt", tmp_path / "timm")
    images = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    loaded = [encoders.load_encoder(checkpoint_dir=str(tmp_path / "ckpt")),
              encoders.load_encoder(timm_dir=str(tmp_path / "timm")),
              encoders.load_encoder(model="vit_test", weights=str(tmp_path / "timm" / "model.safetensors")),
              encoders.load_encoder(model="vit_test", weights=str(tmp_path / "ckpt"))]
    out = [np.asarray(e.forward(images)) for e in loaded]
    for o in out[1:]:
        np.testing.assert_allclose(o, out[0], rtol=1e-5, atol=1e-5)
    assert loaded[0].name == loaded[3].name and len({e.name for e in loaded}) == 3
    (tmp_path / "timm" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'xmag_jax.arch'"):
        encoders.load_encoder(timm_dir=str(tmp_path / "timm"))
    with pytest.raises(ValueError, match="holds 'vit_test', not --model 'vit_s14'"):
        encoders.load_encoder(model="vit_s14", weights=str(tmp_path / "ckpt"))


def test_attention_heatmap_over_thumbnail(run):
    from PIL import Image

    from xmag_jax.eval import heatmap

    out, _, _ = run
    bag = feature_h5.read(out / "slide_001.h5")
    attention = np.linspace(0, 1, len(bag.coords))
    path = heatmap.write_heatmap(bag, attention, out / "maps", max_side=256)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    thumb, ds = heatmap.thumbnail_of(bag, None, 256)
    assert image.shape == thumb.shape and max(image.shape[:2]) <= 257
    side = bag.attrs["patch_size_level0"] / ds

    def tint(xy):
        """Mean colour the overlay added over the inner half of a tile (away from any neighbour's edge)."""
        x0, y0 = (xy / ds + side / 4).astype(int)
        x1, y1 = (xy / ds + 3 * side / 4).astype(int)
        return (image[y0:y1, x0:x1] - thumb[y0:y1, x0:x1].astype(int)).reshape(-1, 3).mean(axis=0)

    hot, cold = tint(bag.coords[-1]), tint(bag.coords[0])
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40  # top attention tints red, bottom blue


def test_slide_failing_mid_read_leaves_others_intact(run, slides, encoder, tmp_path, monkeypatch):
    """slide_001 fails on its 4th tile while its first tiles share a batch with slide_000's last one."""
    out, report, _ = run
    calls = {"n": 0}
    real_read = slide_reader.read_field

    def flaky_read(slide, x0, y0, size_level0, out_px, **kw):
        if slide.slide_id == "slide_001":
            calls["n"] += 1
            if calls["n"] == 4:
                raise slide_reader.RegionReadError(f"{slide.path}: injected read error")
        return real_read(slide, x0, y0, size_level0, out_px, **kw)

    monkeypatch.setattr(slide_reader, "read_field", flaky_read)
    specs = [s for s in inputs.list_slides(str(slides)) if s.slide_id in ("slide_000", "slide_001")]
    assert report.tiles["slide_000"] % 8 != 0  # so the two slides share a batch
    with pytest.warns(UserWarning, match="injected read error"):
        again = embed_run.embed_slides(specs, encoder, tmp_path, Tiling(MPP), batch=8, workers=1, progress=False,
                                   isolate=False)  # the patched reader is in this process
    assert again.done == ["slide_000"] and again.failed == ["slide_001"]
    assert not (tmp_path / "slide_001.h5").exists()
    with h5py.File(tmp_path / "slide_000.h5", "r") as f, h5py.File(out / "slide_000.h5", "r") as ref:
        np.testing.assert_allclose(f["features"][...], ref["features"][...], rtol=1e-5, atol=1e-5)


def test_tokens_are_each_tiles_pooled_patch_tokens_and_survival_reads_them(slides, encoder, tmp_path):
    from xmag_jax.survival import slides as survival_slides

    specs = [s for s in inputs.list_slides(str(slides)) if s.slide_id == "slide_001"]
    report = embed_run.embed_slides(specs, encoder, tmp_path, Tiling(MPP), batch=8, workers=1, progress=False,
                                isolate=False, tokens=4)
    assert report.done == ["slide_001"]
    with h5py.File(tmp_path / "slide_001.h5", "r") as f:
        coords, tokens = f["coords"][...], f["tokens"]
        assert tokens.dtype == np.float16 and tokens.shape == (len(coords), 4, 4, encoder.embed_dim)
        assert tokens.attrs["token_grid"] == 4 and tokens.attrs["patch_grid"] == 16
        assert tokens.attrs["um_per_word"] == pytest.approx(224 * MPP / 4)
        stored = tokens[...]
    with slide_reader.open_slide(slides / "slide_001.tif") as slide:
        field = round(224 * MPP / slide.mpp)
        tile = slide_reader.read_field(slide, *coords[-1], field, 224)
    batch = np.zeros((8, 224, 224, 3), np.uint8)
    batch[0] = tile
    _, patches = encoder.forward_with_tokens(batch)
    expected = feature_h5.pool_tokens(np.asarray(patches)[:1], 4)[0]
    np.testing.assert_allclose(stored[-1].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not np.allclose(stored[0], stored[-1])  # rows follow coords, not one tile repeated
    # the same folder without --tokens is another preprocessing: refused unless --overwrite
    with pytest.raises(embed_run.StaleFeaturesError):
        embed_run.embed_slides(specs, encoder, tmp_path, Tiling(MPP), batch=8, workers=1, progress=False,
                           isolate=False)
    (bag,), _ = survival_slides.load_slides(tmp_path, ["slide_001"])
    assert bag.words.shape == (len(coords), 16, encoder.embed_dim)
    np.testing.assert_allclose(bag.words[-1].reshape(4, 4, -1), stored[-1].astype(np.float32), rtol=1e-6)
