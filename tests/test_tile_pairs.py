"""tile_pairs end to end: Beam pipeline, TFDS + Grain round trip, alignment, failures, resume, inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import data_prep_fixtures as fx
import grain
import h5py
import numpy as np
import pytest
import simplejpeg
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import tile_pairs
from xmag_jax.errors import UserError
from xmag_jax.formats import pair_records

FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1", "--noprogress", "--noisolation"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(slides, out, *extra, fast=True):
    argv = ["--slides", str(slides), "--out", str(out), *extra, *(FAST if fast else [])]
    assert tile_pairs.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def read_split(out, split):
    source = grain.sources.ArrayRecordDataSource(pair_records.shard_paths(out, split))
    return [pair_records.decode_pair(source[i]) for i in range(len(source))]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    fx.make_slides(folder, 4)
    return folder


@pytest.fixture(scope="module")
def dataset(slides, tmp_path_factory):
    """The default command (multi-process DirectRunner, 2 workers) on 2 x 40x SVS + 2 x 20x TIFF."""
    out = tmp_path_factory.mktemp("pairs")
    summary = run(slides, out, "--val_fraction", "0.25", "--examples_per_shard", "5",
                  "--direct_num_workers=2", "--noprogress", fast=False)
    return out, summary


def test_tfds_and_grain_see_the_same_splits_and_counts(dataset):
    out, summary = dataset
    assert summary["failed"] == 0 and summary["slides_per_split"] == {"train": 3, "val": 1}
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.name == "xmag_pairs"
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert counts == summary["pairs"] and counts["train"] > 5
    assert builder.info.splits["train"].num_shards == -(-counts["train"] // 5)
    for split, n in counts.items():
        assert len(grain.sources.ArrayRecordDataSource(pair_records.shard_paths(out, split))) == n
    example = builder.as_data_source(split="val")[0]
    assert example["image_5x"].shape == (224, 224, 3) and example["image_20x"].shape == (896, 896, 3)


def test_split_by_slide(dataset):
    out, _ = dataset
    ids = {split: {p["slide_id"] for p in read_split(out, split)} for split in ("train", "val")}
    assert ids["train"].isdisjoint(ids["val"]) and len(ids["train"] | ids["val"]) == 4


@pytest.fixture(scope="module")
def resized_dataset(slides, tmp_path_factory):
    """XMAG's 5x view: the 5x tile Lanczos-resized from the 20x region (in-process runner)."""
    out = tmp_path_factory.mktemp("pairs_resize")
    return out, run(slides, out, "--val_fraction", "0.25", "--low_mag_source", "resize")


@pytest.mark.parametrize("source", ["pyramid", "resize"])
def test_pairs_are_aligned_and_on_tissue_at_both_scan_magnifications(source, request):
    out, _ = request.getfixturevalue({"pyramid": "dataset", "resize": "resized_dataset"}[source])
    assert pair_records.read_metadata(out)["low_mag_source"] == source
    assert source in tfds.builder_from_directory(str(out)).info.description
    pairs = read_split(out, "train") + read_split(out, "val")
    assert {round(p["mpp_5x"], 4) for p in pairs} == {2.0} and {round(p["mpp_20x"], 4) for p in pairs} == {0.5}
    for p in pairs:
        tile = simplejpeg.decode_jpeg(p["image_5x"])
        region = simplejpeg.decode_jpeg(p["image_20x"])
        assert tile.shape == (224, 224, 3) and region.shape == (896, 896, 3)
        assert psnr(np.asarray(Image.fromarray(region).reduce(4)), tile) > 30, p["slide_id"]
        assert p["tissue_fraction"] >= 0.25 and p["x"] % 896 == 0 and p["y"] % 896 == 0
        assert (tile.min(-1) < 220).mean() > 0.2, "a kept tile shows tissue"
    scans = {p["slide_id"]: p["x"] for p in pairs}
    assert {"slide_000", "slide_001"} <= scans.keys()  # 40x SVS and 20x TIFF both contribute


def test_outputs_for_people(dataset):
    out, _ = dataset
    assert sorted(os.listdir(out / "overlays")) == [f"slide_{i:03d}.png" for i in range(4)]
    with open(out / "slides.csv") as f:
        assert f.readline().strip() == "slide_id,split,pairs,mpp_level0,path" and len(f.readlines()) == 4
    assert (out / "failures.jsonl").read_text() == ""
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_bad_slides_are_reported_and_counted(slides, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.symlink(slides / "slide_001.tif", folder / "good.tif")
    fx.not_a_slide(folder / "readme.svs")
    fx.truncated(slides / "slide_000.svs", folder / "cut.svs")
    fx.without_mpp(folder / "nompp.tif")
    fx.corrupt_tiles(slides / "slide_001.tif", folder / "badtiles.tif", every=2)
    summary = run(folder, tmp_path / "out", "--max_failure_fraction", "0.9")
    failures = {f["slide_id"]: f
                for f in map(json.loads, (tmp_path / "out" / "failures.jsonl").read_text().splitlines())}
    assert {k: f["error_type"] for k, f in failures.items()} == {
        "readme": "NotASlideError", "cut": "RegionReadError", "nompp": "MissingMppError",
        "badtiles": "RegionReadError"}
    assert "`mpp` column" in failures["nompp"]["message"] and failures["cut"]["slide"].endswith("cut.svs")
    assert summary["failed"] == 4 and summary["failures_by_type"] == {
        "NotASlideError": 1, "RegionReadError": 2, "MissingMppError": 1}
    assert sum(summary["pairs"].values()) > 0
    with pytest.raises(SystemExit, match="4 of 5 slides failed"):
        tile_pairs.main(["--slides", str(folder), "--out", str(tmp_path / "out2"), "--max_failure_fraction", "0.5",
                         *FAST])
    assert not os.path.exists(tmp_path / "out2" / "dataset_info.json")


def test_csv_manifest_mpp_and_split_columns(slides, tmp_path):
    fx.without_mpp(tmp_path / "nompp.tif")  # referenced by the manifest below
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp,split\n{slides / 'slide_000.svs'},,train\n{slides / 'slide_001.tif'},,test\n"
                        f"nompp.tif,0.5,test\n")
    summary = run(manifest, tmp_path / "out", "--min_tissue", "0.1")
    assert summary["failed"] == 0 and summary["slides_per_split"] == {"test": 2, "train": 1}
    assert {p["slide_id"] for p in read_split(tmp_path / "out", "test")} == {"slide_001", "nompp"}
    bad = tmp_path / "bad.csv"
    bad.write_text("file,mpp\nx.svs,0.25\n")
    with pytest.raises(UserError, match="needs a `path` column"):
        tile_pairs.main(["--slides", str(bad), "--out", str(tmp_path / "o"), *FAST])


def test_trident_and_clam_coordinates_replace_tissue_detection(slides, tmp_path):
    coords_dir = tmp_path / "coords"
    coords_dir.mkdir()
    with h5py.File(coords_dir / "slide_000.h5", "w") as f:  # TRIDENT at 5x: fields of 1792 level-0 px
        ds = f.create_dataset("coords", data=np.array([[0, 0], [1792, 1792]], np.int64))
        ds.attrs.update(patch_size=224, patch_size_level0=1792, level0_magnification=40, target_magnification=5)
    with h5py.File(coords_dir / "slide_001_patches.h5", "w") as f:  # CLAM at 20x: 256 px patches, level 0
        ds = f.create_dataset("coords", data=np.array([[x, y] for x in range(0, 896, 256) for y in range(0, 896, 256)]))
        ds.attrs.update(patch_size=256, patch_level=0, downsample=np.array([1.0, 1.0]))
    manifest = tmp_path / "two.csv"
    manifest.write_text(f"path\n{slides / 'slide_000.svs'}\n{slides / 'slide_001.tif'}\n")
    run(manifest, tmp_path / "out", "--coords_dir", str(coords_dir), "--val_fraction", "0")
    pairs = read_split(tmp_path / "out", "train")
    assert sorted((p["slide_id"], p["x"], p["y"]) for p in pairs) == [
        ("slide_000", 0, 0), ("slide_000", 1792, 1792), ("slide_001", 0, 0)]


def test_rerun_skips_done_slides_and_ignores_partial_files(slides, tmp_path):
    out = tmp_path / "out"
    first = run(slides, out)
    work = out / "work"
    os.remove(work / "slide_002.done.json")  # as if killed after writing its shard, before its marker
    (work / "slide_003.array_record.tmp-4242-deadbeef").write_bytes(b"half a shard")
    (out / "xmag_pairs-train.array_record-00000-of-00009.tmp-4242-beef").write_bytes(b"half")
    second = run(slides, out)
    assert second["skipped_already_done"] == 3 and second["tiled_now"] == 1
    assert second["pairs"] == first["pairs"]
    assert not [n for n in os.listdir(out) + os.listdir(work) if ".tmp" in n]
    changed = run(slides, out, "--jpeg_quality", "80")
    assert changed["skipped_already_done"] == 0, "other options: slides are redone"


def test_resume_after_a_killed_run(slides, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.tile_pairs", "--slides", str(slides), "--out", str(out), *FAST]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "work").glob("*.done.json")) if (out / "work").exists() else True:
        assert time.time() < deadline and proc.poll() is None, "first slide never finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset_info.json").exists()
    with pytest.raises((FileNotFoundError, ValueError)):
        pair_records.shard_paths(out, "train")
    summary = run(slides, out)
    assert summary["skipped_already_done"] >= 1 and summary["failed"] == 0
    total = sum(summary["pairs"].values())
    assert total == sum(len(read_split(out, s)) for s in summary["pairs"])


def test_help_and_unknown_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tile_pairs.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for phrase in ("µm/px", "--mpp_5x", "--max_failure_fraction", "DataflowRunner", "failures.jsonl",
                   "(default: pyramid)", "--[no]allow_upsample", "--[no]isolation"):
        assert phrase in help_text
    with pytest.raises(UserError, match="min_tisue"):
        tile_pairs.main(["--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--min_tisue", "0.3"])
    with pytest.raises(UserError, match=r"did you mean --min_tissue\?"):
        tile_pairs.main(["--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--min-tissue", "0.3"])
    with pytest.raises(UserError, match="--low_mag_source=crop: value should be one of <pyramid|resize>"):
        tile_pairs.main(["--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--low_mag_source", "crop"])


def _isolated(process, work_dir):
    """A `SlideToPairs` stage set up as a Beam worker does (its child process started)."""
    stage = tile_pairs.SlideToPairs(None, str(work_dir), None, isolate=True, process=process)
    stage.setup()
    return stage


def test_a_crashing_decoder_fails_only_its_slide(tmp_path):
    from xmag_jax.wsi import inputs

    stage = _isolated(fx.crash_on_bad, tmp_path)
    try:
        (crashed,) = stage.process(inputs.SlideSpec("/x/bad.svs", "bad"))
        assert (crashed["error_type"], crashed["slide"]) == ("ReaderCrash", "/x/bad.svs")
        assert "died of SIGSEGV" in crashed["message"]
        assert json.loads((tmp_path / "bad.failed.json").read_text()) == crashed
        (fine,) = stage.process(inputs.SlideSpec("/x/good.svs", "good"))
        assert fine["status"] == "done" and fine["pid"] != os.getpid()
    finally:
        stage.teardown()


def test_a_worker_killed_from_outside_blames_no_slide(tmp_path):
    from xmag_jax.wsi import inputs

    stage = _isolated(fx.killed_once, tmp_path)
    try:
        with pytest.warns(UserWarning, match=r"died \(SIGKILL\), not of a decoder fault: reading slide good again"):
            (result,) = stage.process(inputs.SlideSpec("/x/good.svs", "good"))
        assert (tmp_path / "killed").exists(), "the first child was killed"
        assert result["status"] == "done" and not (tmp_path / "good.failed.json").exists()
    finally:
        stage.teardown()


def test_mpp_tolerance(slides, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,slide_id,mpp\n{slides / 'slide_001.tif'},near20x,0.52\n"
                        f"{slides / 'slide_001.tif'},coarse,0.6\n")
    summary = run(manifest, tmp_path / "out", "--val_fraction", "0", "--max_failure_fraction", "1")
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert (failure["slide_id"], failure["error_type"]) == ("coarse", "ResolutionError")
    assert "coarser than the 20x target 0.5 µm/px" in failure["message"]
    pairs = read_split(tmp_path / "out", "train")
    assert summary["pairs"] == {"train": len(pairs)} and pairs
    field = round(224 * 2.0 / 0.52)  # 862 level-0 px: 20x region slightly upsampled, 5x tile box-filtered
    for p in pairs:
        assert p["mpp_20x"] == pytest.approx(field * 0.52 / 896, rel=1e-6)
        assert p["mpp_5x"] == pytest.approx(field * 0.52 / 224, rel=1e-6) and p["x"] % field == 0
        region = simplejpeg.decode_jpeg(p["image_20x"])
        assert psnr(np.asarray(Image.fromarray(region).reduce(4)), simplejpeg.decode_jpeg(p["image_5x"])) > 30


def test_resize_source_is_the_lanczos_resize_of_the_20x_region(resized_dataset):
    from data_prep import pairs
    from xmag_jax.wsi import slide_reader

    out, _ = resized_dataset
    p = read_split(out, "train")[0]
    with open(out / "slides.csv") as f:
        paths = {row.split(",")[0]: row.strip().split(",")[-1] for row in f.readlines()[1:]}
    with slide_reader.open_slide(paths[p["slide_id"]]) as slide:
        field = round(224 * 2.0 / slide.mpp)
        region = slide_reader.read_field_image(slide, p["x"], p["y"], field, 896)
        pyramid_5x = slide_reader.read_field_image(slide, p["x"], p["y"], field, 224)
    assert p["image_20x"] == pairs.encode_jpeg(region, 90)
    assert p["image_5x"] == pairs.encode_jpeg(region.resize((224, 224), Image.LANCZOS), 90)
    assert p["image_5x"] != pairs.encode_jpeg(pyramid_5x, 90)
