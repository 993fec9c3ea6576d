"""tile_bags: embed's tile plan as JPEG bags with TFDS metadata, slides.csv index, failures, resume, bad flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
from array_record.python import array_record_module

from data_prep import tile_bags
from xmag_jax.embed import plan as embed_plan
from xmag_jax.formats import bag_records
from xmag_jax.wsi import inputs, slide_reader, synthetic

MPP = 1.0  # µm/px: a 1 mm synthetic slide gives a 4x4 grid of 224 px tiles
ARGS = ["--mpp", str(MPP), "--noprogress", "--noisolation", "--direct_running_mode=in_memory",
        "--direct_num_workers=1"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    synthetic.write_dataset(str(d), 2, size_px=4096, seed=0)
    (d / "broken.svs").write_bytes(b"not a slide at all")
    return d


@pytest.fixture(scope="module")
def bags(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("bags")
    args, beam_args = tile_bags.COMMAND.parse(["--slides", str(slides), "--out", str(out),
                                                                 "--max_failure_fraction", "0.5", *ARGS])
    return out, tile_bags.run(args, beam_args)


def test_tiles_are_embeds_plan_and_pixels(bags, slides):
    out, summary = bags
    assert summary["failed"] == 1 and summary["failures_by_type"] == {"NotASlideError": 1}, summary
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["slide_id"] for f in failures] == ["broken"]
    entries = bag_records.read_slides(out)
    assert sorted(entries) == ["slide_000", "slide_001"]
    assert summary["tiles"] == sum(e.tiles for e in entries.values())
    (shard,) = bag_records.shard_paths(out)
    reader = array_record_module.ArrayRecordReader(shard)
    tiling = embed_plan.Tiling(MPP)
    for name in ("slide_000.svs", "slide_001.tif"):
        spec = inputs.SlideSpec(path=str(slides / name), slide_id=name.split(".")[0])
        entry = entries[spec.slide_id]
        with slide_reader.open_slide(spec.path) as slide:
            plan = embed_plan.plan_slide(slide, spec, tiling)
            records = [bag_records.decode_tile(r) for r in reader.read(list(range(entry.first,
                                                                                  entry.first + entry.tiles)))]
            assert [[r["x"], r["y"]] for r in records] == plan.coords.tolist()
            assert {r["slide_id"] for r in records} == {spec.slide_id}
            assert all(abs(r["mpp"] - MPP) < 1e-6 for r in records) and entry.field_level0 == plan.field_level0
            x, y = plan.coords[0]
            expected = slide_reader.read_field(slide, int(x), int(y), plan.field_level0, 224).astype(float)
            got = simplejpeg.decode_jpeg(records[0]["image"], colorspace="RGB").astype(float)
            assert got.shape == (224, 224, 3) and np.abs(got - expected).mean() < 4.0  # JPEG q90
    reader.close()
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["splits"][0]["name"] == "train"
    assert json.loads((out / "metadata.json").read_text())["mpp"] == MPP


def test_rerun_skips_done_slides_and_retiles_a_changed_shard(bags, slides):
    out, _ = bags
    args, beam_args = tile_bags.COMMAND.parse(["--slides", str(slides), "--out", str(out),
                                                                 "--max_failure_fraction", "0.5", *ARGS])
    again = tile_bags.run(args, beam_args)
    assert again["skipped_already_done"] == 2 and again["tiled_now"] == 0, again
    with open(out / "work" / "slide_001.array_record", "r+b") as f:  # a shard that changed since its marker
        f.truncate(100)
    third = tile_bags.run(args, beam_args)
    assert third["skipped_already_done"] == 1 and third["tiles"] == again["tiles"], third


def test_bad_flags_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "data_prep.tile_bags", "--slides", str(tmp_path), "--out",
                           str(tmp_path / "o"), "--patch_px", "0"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m data_prep.tile_bags: error: --patch_px 0: expected a tile side >= 14 px"], proc.stderr


def test_the_command_line_reads_slides_in_a_child_process(slides, tmp_path):
    """Beam's default options and isolation on, as a user runs it: Beam's workers and the isolated reader unpickle
    `BagConfig` and `process_slide`, which must not be looked up on `__main__`."""
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path\n{slides / 'slide_001.tif'}\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "data_prep.tile_bags", "--slides", str(manifest), "--out",
                           str(tmp_path / "o"), "--mpp", str(MPP), "--noprogress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["failed"], summary["slides_with_tiles"]) == (0, 1) and summary["tiles"] > 0
