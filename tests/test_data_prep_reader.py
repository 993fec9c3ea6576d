"""slide_reader + tissue: pixel size from every source, level choice, aligned reads, tissue mask and grid."""
import data_prep_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from xmag_jax.wsi import slide_reader, synthetic, tissue


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides")
    svs, tif = fx.make_slides(out, 2)
    return {"svs": svs, "tif": tif, "dir": out}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def test_mpp_from_each_source(slides, tmp_path):
    with slide_reader.open_slide(slides["svs"]) as s:
        assert (s.mpp, s.backend, s.mpp_source) == (0.25, "openslide", "openslide.mpp-x/y")
    with slide_reader.open_slide(slides["tif"]) as s:
        assert s.mpp == pytest.approx(0.5)
    with slide_reader.open_slide(fx.stripped_tiff(slides["tif"], tmp_path / "strips.tif")) as s:
        assert s.backend == "tiffslide" and s.mpp == pytest.approx(0.5)
    with slide_reader.open_slide(slides["tif"], mpp=0.46) as s:
        assert (s.mpp, s.mpp_source) == (0.46, "given")
    assert slide_reader.mpp_from_properties({"aperio.MPP": "0.2520"}) == ((0.252, 0.252), "Aperio MPP")
    (mx, my), src = slide_reader.mpp_from_properties(
        {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"})
    assert (mx, my, src) == (pytest.approx(0.25), pytest.approx(0.25), "TIFF resolution tags (inch)")
    assert slide_reader.mpp_from_properties({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) is None
    assert slide_reader.mpp_from_properties({"openslide.objective-power": "20"}) is None


def test_missing_or_implausible_mpp_names_the_slide_and_the_csv_column(tmp_path):
    path = fx.without_mpp(tmp_path / "no_mpp.tif")
    with pytest.raises(slide_reader.MissingMppError, match=r"no_mpp\.tif.*CSV manifest's `mpp` column"):
        slide_reader.open_slide(path)
    with slide_reader.open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5
    import tifffile
    dpi = tmp_path / "screen_72dpi.tif"
    tifffile.imwrite(dpi, np.zeros((256, 256, 3), np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(72, 72), resolutionunit="INCH", metadata=None)
    with pytest.raises(slide_reader.MissingMppError, match="not a microscope's"):
        slide_reader.open_slide(dpi)


def test_not_a_slide(tmp_path):
    with pytest.raises(slide_reader.NotASlideError, match="notes.svs"):
        slide_reader.open_slide(fx.not_a_slide(tmp_path / "notes.svs"))
    with pytest.raises(slide_reader.NotASlideError, match="no such file"):
        slide_reader.open_slide(tmp_path / "missing.svs")
    garbage = tmp_path / "garbage.tif"  # a TIFF header over random bytes: tiffslide accepts it lazily
    garbage.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(slide_reader.NotASlideError, match="garbage.tif"):
        slide_reader.open_slide(garbage)


def test_best_level():
    ds = (1.0, 4.0002, 16.001)
    assert slide_reader.best_level(ds, 2.0) == 0
    assert slide_reader.best_level(ds, 4.0) == 1  # rounded downsample within 1 %
    assert slide_reader.best_level(ds, 8.0) == 1
    assert slide_reader.best_level(ds, 32.0) == 2
    assert slide_reader.best_level(ds, 0.5) == 0


@pytest.mark.parametrize("kind", ["svs", "tif"])
def test_20x_region_and_5x_tile_show_the_same_field(slides, kind):
    with slide_reader.open_slide(slides[kind]) as s:
        field = round(224 * 2.0 / s.mpp)  # 1792 px at 40x, 896 px at 20x
        x, y = field, field // 2
        tile_5x = slide_reader.read_field(s, x, y, field, 224)
        region_20x = slide_reader.read_field(s, x, y, field, 896)
        assert tile_5x.shape == (224, 224, 3) and region_20x.shape == (896, 896, 3)
        down = np.asarray(Image.fromarray(region_20x).reduce(4))
        assert psnr(down, tile_5x) > 30
        shift = round(2.0 / s.mpp)  # one 5x pixel
        shifted = np.asarray(Image.fromarray(slide_reader.read_field(s, x + shift, y, field, 896)).reduce(4))
        assert psnr(shifted, tile_5x) < psnr(down, tile_5x) - 3


def test_region_outside_the_scan_is_white(slides):
    with slide_reader.open_slide(slides["tif"]) as s:
        w, _ = s.dimensions
        out = slide_reader.read_field(s, w - 100, 0, 400, 100)
        assert out[:, 40:].min() == 255


def test_unreadable_region(slides, tmp_path):
    with slide_reader.open_slide(fx.corrupt_tiles(slides["tif"], tmp_path / "bad_tiles.tif")) as s:
        with pytest.raises(slide_reader.RegionReadError, match="bad_tiles.tif.*level 0"):
            slide_reader.read_field(s, 0, 0, 2048, 896)


def test_tissue_mask_matches_the_synthetic_ground_truth():
    scene = synthetic.make_scene(2048.0, 1, np.random.default_rng(3))
    mpp = 8.0
    n = int(2048 / mpp)
    thumb = synthetic.render_rows(scene, 0, n, n, mpp)
    mask = tissue.tissue_mask(thumb, mpp)
    truth = synthetic._sample(scene.tissue, scene.tissue_grid_um, 0, n, n, mpp) > 0
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85
    assert not tissue.tissue_mask(np.full((64, 64, 3), 245, np.uint8), mpp).any()


def test_grid_keeps_tissue_and_drops_background(slides, tmp_path):
    with slide_reader.open_slide(slides["svs"]) as s:
        thumb, mask, ds = tissue.slide_mask(s)
        field = 1792
        everything = tissue.tile_grid(s.dimensions, field, mask, ds, 0.0)
        kept = tissue.tile_grid(s.dimensions, field, mask, ds, 0.25)
        assert len(everything.coords) == 4
        assert 0 < len(kept.coords) <= 4 and (kept.tissue_fraction >= 0.25).all()
        dropped = {tuple(c) for c in everything.coords} - {tuple(c) for c in kept.coords}
        for x, y in dropped:
            glass = slide_reader.read_field(s, x, y, field, 224)
            assert (glass.min(-1) > 220).mean() > 0.75
        tissue.write_overlay(str(tmp_path / "overlay.png"), thumb, mask, kept, ds)
        assert Image.open(tmp_path / "overlay.png").size == thumb.shape[1::-1]


def test_tissue_fractions_on_a_known_mask():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    coords = np.array([[0, 0], [40, 0], [20, 20]])
    np.testing.assert_allclose(tissue.tissue_fractions(mask, 4.0, coords, 20.0), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(tissue.tissue_fractions(mask, 4.0, np.array([[8, 0]]), 20.0), [0.6])
