"""Synthetic slides: OpenSlide opens both scan formats with a physical pixel size; labels.csv."""
import csv

import numpy as np
import openslide
import pytest

from xmag_jax.wsi import synthetic


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert synthetic.main(["--out", str(out), "--n", "4", "--size", "4096", "--seed", "1"]) == 0
    return out


def test_aperio_svs_at_40x(slides):
    slide = openslide.OpenSlide(slides / "slide_000.svs")
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(slide.properties["aperio.MPP"]) == pytest.approx(0.25)
    assert slide.properties["aperio.AppMag"] == "40"
    assert slide.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
    assert slide.level_downsamples == (1.0, 4.0, 16.0)


def test_generic_tiff_at_20x_has_resolution_tags(slides):
    slide = openslide.OpenSlide(slides / "slide_001.tif")
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
    assert slide.level_dimensions == ((2048, 2048), (512, 512), (128, 128))


def test_content_looks_like_he_on_glass(slides):
    slide = openslide.OpenSlide(slides / "slide_000.svs")
    thumb = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB")).astype(int)
    background = thumb.min(axis=-1) > 225
    tissue = ~background
    assert 0.2 < tissue.mean() < 0.8, "tissue islands on white glass"
    r, g, b = (thumb[..., c][tissue].mean() for c in range(3))
    assert r > g and b > g, "eosin/hematoxylin: pink-purple tissue (green absorbed most)"
    corner = np.asarray(slide.read_region((0, 0), 0, (64, 64)).convert("RGB"))
    assert corner.min() > 225, "slide border is glass"


def test_labels_csv_names_every_slide_with_two_classes(slides):
    with open(slides / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["slide_000", "slide_001", "slide_002", "slide_003"]
    assert sorted(r["label"] for r in rows) == ["0", "0", "1", "1"]
    assert {p.stem for p in slides.iterdir() if p.suffix in (".svs", ".tif")} == {r["slide_id"] for r in rows}


def test_dense_class_has_more_nuclei():
    rng = np.random.default_rng(0)
    sparse, dense = synthetic.make_scene(1024.0, 0, rng), synthetic.make_scene(1024.0, 1, rng)
    assert len(dense.nuclei) > 1.5 * len(sparse.nuclei)

    def elongation(s):
        return float(np.mean(s.nuclei[:, 2] / s.nuclei[:, 3]))

    assert elongation(dense) > 1.8 > 1.3 > elongation(sparse)
