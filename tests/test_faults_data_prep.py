"""data_prep under faults: concurrent jobs, wrong µm/px, hostile manifests, truncated shards, failed slides
counted in splits, slide-sized memory, bad command-line values. Each test fails on the behaviour before it."""
import json
import logging
import os
import subprocess
import sys

import data_prep_fixtures as fx
import numpy as np
import pytest
import simplejpeg
import tifffile
from array_record.python import array_record_module

from data_prep import tile_pairs
from xmag_jax import errors, workdir_lock
from xmag_jax.formats import pair_records
from xmag_jax.wsi import inputs

FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1", "--noprogress", "--noisolation"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO}


def run(slides, out, *extra):
    assert tile_pairs.main(["--slides", str(slides), "--out", str(out), *extra, *FAST]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def cli(module, *argv):
    """`python -m module argv` → (exit status, stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    fx.make_slides(folder, 2)  # slide_000.svs (0.25 µm/px), slide_001.tif (0.5 µm/px)
    return folder


def test_a_second_job_on_the_same_out_is_refused_and_leaves_the_first_ones_files(slides, tmp_path):
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    in_flight = out / "work" / "slide_000.array_record.tmp-4242-deadbeef"  # the first job's shard being written
    in_flight.write_bytes(b"half a shard")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from xmag_jax import workdir_lock\n"
         f"workdir_lock.acquire({str(out)!r}, job='tile_pairs'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by tile_pairs .*pid {holder.pid}"):
            tile_pairs.main(["--slides", str(slides), "--out", str(out), *FAST])
        assert in_flight.exists() and not (out / "dataset_info.json").exists()
    finally:
        holder.stdin.close()
        holder.wait()


def test_mpp_ratio_must_be_the_field_geometry(slides, tmp_path):
    with pytest.raises(pair_records.GeometryError, match="ratio must be 4"):
        tile_pairs.main(["--slides", str(slides), "--out", str(tmp_path / "out"), "--mpp_5x", "0.5",
                         "--mpp_20x", "2.0", *FAST])
    assert not (tmp_path / "out").exists(), "stopped before reading a slide"


def test_upsampling_is_refused_per_slide_unless_allowed(slides, tmp_path):
    manifest = tmp_path / "m.csv"  # the 0.5 µm/px TIFF declared as a 1.0 µm/px (10x) scan
    manifest.write_text(f"path,slide_id,mpp\n{slides / 'slide_000.svs'},good,\n{slides / 'slide_001.tif'},x10,1.0\n")
    summary = run(manifest, tmp_path / "out", "--max_failure_fraction", "1", "--val_fraction", "0")
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert (failure["slide_id"], failure["error_type"]) == ("x10", "ResolutionError")
    assert "--allow_upsample" in failure["message"] and summary["slides_per_split"] == {"train": 1}
    summary = run(manifest, tmp_path / "up", "--allow_upsample", "--val_fraction", "0")
    assert summary["failed"] == 0 and summary["slides_per_split"] == {"train": 2}
    assert pair_records.read_metadata(tmp_path / "up")["allow_upsample"] is True


def _write_pairs(directory, mpp_5x, mpp_20x, n=4):
    directory.mkdir(parents=True, exist_ok=True)
    jpeg_5x = simplejpeg.encode_jpeg(np.full((224, 224, 3), 128, np.uint8))
    jpeg_20x = simplejpeg.encode_jpeg(np.full((896, 896, 3), 128, np.uint8))
    shard = directory / pair_records.shard_name("train", 0, 1)
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    for i in range(n):
        writer.write(pair_records.encode_pair({"image_5x": jpeg_5x, "image_20x": jpeg_20x, "slide_id": "s", "x": i,
                                               "y": 0, "mpp_5x": mpp_5x, "mpp_20x": mpp_20x, "tissue_fraction": 1.0}))
    writer.close()
    return directory


def test_training_refuses_records_that_are_not_the_field_geometry(tmp_path):
    from configs.debug import get_config
    from xmag_jax.data import build_dataset

    data = get_config().data
    data.worker_count = 0
    data.dir = str(_write_pairs(tmp_path / "good", 2.0, 0.5))
    assert pair_records.check_field_geometry(data.dir, "train") == {"mpp_5x": 2.0, "mpp_20x": 0.5}
    build_dataset(data, seed=0, batch_size=2, process_index=0, process_count=1)
    data.dir = str(_write_pairs(tmp_path / "upsampled", 0.5, 2.0))
    with pytest.raises(pair_records.GeometryError, match=r"upsampled split 'train' record 0 .*ratio must be 4"):
        build_dataset(data, seed=0, batch_size=2, process_index=0, process_count=1)
    (tmp_path / "good" / pair_records.METADATA_FILE).write_text(json.dumps({"mpp_5x": 1.0, "mpp_20x": 0.5}))
    with pytest.raises(pair_records.GeometryError, match="metadata.json"):
        pair_records.check_field_geometry(tmp_path / "good", "train")


@pytest.mark.parametrize("slide_id", ["../../x", "a/b", "..", ".hidden", "tab\there"])
def test_unsafe_slide_ids_are_refused_before_anything_is_written(slides, tmp_path, slide_id):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'path,slide_id\n{slides / "slide_001.tif"},"{slide_id}"\n')
    out = tmp_path / "deep" / "out"
    with pytest.raises(inputs.ManifestError, match=r"m\.csv:2: slide id .* one file-name component"):
        tile_pairs.main(["--slides", str(manifest), "--out", str(out), *FAST])
    assert sorted(os.listdir(tmp_path)) == ["m.csv"], "nothing written, inside or outside --out"


def test_manifest_columns_are_checked_and_a_byte_order_mark_is_fine(slides, tmp_path):
    manifest = tmp_path / "typo.csv"
    manifest.write_text(f"path,splt\n{slides / 'slide_000.svs'},val\n")
    with pytest.raises(inputs.ManifestError, match=r"typo\.csv: unknown column\(s\) \['splt'\]; .*'split'"):
        inputs.list_slides(str(manifest))
    excel = tmp_path / "excel.csv"
    excel.write_bytes(f"path,split\r\n{slides / 'slide_000.svs'},val\r\n".encode("utf-8-sig"))
    assert [(s.slide_id, s.split) for s in inputs.list_slides(str(excel))] == [("slide_000", "val")]


def test_a_truncated_shard_behind_a_done_marker_is_tiled_again(slides, tmp_path, caplog):
    out = tmp_path / "out"
    first = run(slides, out, "--val_fraction", "0")
    shard = out / "work" / "slide_000.array_record"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        second = run(slides, out, "--val_fraction", "0")
    assert "slide_000" in caplog.text and "tiling the slide again" in caplog.text
    assert (second["skipped_already_done"], second["tiled_now"]) == (1, 1) and second["pairs"] == first["pairs"]
    done = json.loads((out / "work" / "slide_000.done.json").read_text())
    assert (done["num_bytes"], len(done["digest"])) == (shard.stat().st_size, 32)


def test_failed_slides_take_no_place_in_the_splits(slides, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.symlink(slides / "slide_001.tif", folder / "good.tif")
    fx.not_a_slide(folder / "broken.svs")
    specs = inputs.list_slides(str(folder))
    # a seed under which the good slide is the one val slide when failed slides count towards the quota
    seed = next(s for s in range(100) if inputs.assign_splits(specs, 0.1, s)["good"] == "val")
    summary = run(folder, tmp_path / "out", "--split_seed", str(seed), "--max_failure_fraction", "1")
    assert summary["slides_per_split"] == {"train": 1} and list(summary["pairs"]) == ["train"]
    manifest = tmp_path / "all_val.csv"
    manifest.write_text(f"path,split\n{folder / 'good.tif'},val\n")
    with pytest.raises(SystemExit, match="no train split"):
        tile_pairs.main(["--slides", str(manifest), "--out", str(tmp_path / "out2"), *FAST])
    assert not (tmp_path / "out2" / "dataset_info.json").exists()


RSS_PROBE = """
import resource, sys
from xmag_jax.wsi import slide_reader, tissue
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with slide_reader.open_slide(sys.argv[1]) as slide:
    thumb, mask, downsample = tissue.slide_mask(slide)
print(thumb.shape[0], thumb.shape[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def single_level_tiff(path, side: int, mpp: float = 0.25) -> str:
    """A tiled JPEG TIFF without a pyramid, `side` x `side` px at `mpp` µm/px, written tile by tile."""
    tile = np.full((256, 256, 3), 235, np.uint8)
    tile[64:192, 64:192] = (200, 110, 170)

    def tiles():
        for _ in range((side // 256) ** 2):
            yield tile

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    return str(path)


def test_tissue_mask_memory_does_not_grow_with_the_slide(tmp_path):
    side = 8192  # read whole, the level would take 8192² x 4 bytes = 256 MiB before any conversion
    path = single_level_tiff(tmp_path / "flat.tif", side)
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, path], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300, check=True)
    height, width, peak_mib = map(int, proc.stdout.split())
    assert (height, width) == (side // 32, side // 32)  # 8 µm/px thumbnail of a 0.25 µm/px scan
    assert peak_mib < 150, f"reading the thumbnail raised peak RSS by {peak_mib} MiB"  # whole: 365-545 MiB


def test_thumbnail_is_read_in_bounded_blocks_and_equals_a_whole_level_read(slides, monkeypatch):
    from PIL import Image

    from xmag_jax.wsi import slide_reader

    monkeypatch.setattr(slide_reader, "THUMB_READ_PX", 64)
    with slide_reader.open_slide(slides / "slide_000.svs") as slide:  # 4096 px at 0.25 µm/px, levels 1, 4, 16
        read_region, sizes = slide.handle.read_region, []
        monkeypatch.setattr(slide.handle, "read_region", lambda at, level, size: sizes.append(size) or
                            read_region(at, level, size))
        thumb, downsample = slide_reader.read_level_image(slide, 8.0)
        whole = read_region((0, 0), 2, slide.handle.level_dimensions[2]).convert("RGB")
    assert thumb.shape == (128, 128, 3) and downsample == 32 and len(sizes) == 16
    assert max(w * h for w, h in sizes) <= 64 * 64
    np.testing.assert_array_equal(thumb, np.asarray(whole.resize((128, 128), Image.BOX)))


@pytest.mark.parametrize("argv, message", [
    (["--out", "FILE"], "--out .*: expected a folder"),
    (["--mpp_5x", "0"], "--mpp_5x 0.0: expected a pixel size > 0"),
    (["--mpp_5x", "-2", "--mpp_20x", "-0.5"], "--mpp_5x -2.0: expected a pixel size > 0"),
    (["--examples_per_shard", "0"], "--examples_per_shard 0: expected at least 1"),
    (["--jpeg_quality", "500"], "--jpeg_quality 500: expected a JPEG quality in 1..100"),
    (["--val_fraction", "1.5"], "--val_fraction 1.5: expected a fraction"),
])
def test_bad_tile_pairs_values_are_one_line(slides, tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("not a folder")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    full = ["--slides", str(slides), "--out", str(tmp_path / "out"), *argv, *FAST]
    with pytest.raises(SystemExit) as exit_info:
        errors.run_cli(tile_pairs.main, prog=tile_pairs.PROG, argv=full)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m data_prep.tile_pairs: error: ") and __import__("re").search(message, err)


def test_data_prep_command_lines_report_bad_values_in_one_line(slides, tmp_path):
    rc, err = cli("data_prep.tile_pairs", "--slides", slides, "--out", tmp_path / "o", "--jpeg_quality", "500")
    assert (rc, err.strip().splitlines()) == (2, [
        "python -m data_prep.tile_pairs: error: --jpeg_quality 500: expected a JPEG quality in 1..100"])
    rc, err = cli("xmag_jax.wsi.synthetic", "--out", tmp_path / "syn", "--n", "-1")
    assert (rc, err.strip()) == (2, "python -m xmag_jax.wsi.synthetic: error: --n -1: expected an integer >= 1")
    rc, err = cli("data_prep.tile_pairs", "--slides", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "neither a folder of slides nor a CSV" in err
