"""Write-then-rename: results appear complete or not at all, and no temporary is left behind."""

import os
import tempfile
from pathlib import Path

import epath_bucket
import pytest

from xmag_jax import atomic


def test_directory_replaces_the_old_one_only_on_success(tmp_path):
    out = tmp_path / "sub" / "model"
    with atomic.target(out, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == out.parent and tmp.name.startswith(".model.tmp-")
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.target(out, directory=True) as tmp:
            (tmp / "a.txt").write_text("second, half-written")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]

    with atomic.target(out, directory=True) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_file_appears_only_complete(tmp_path):
    out = tmp_path / "slide.h5"
    with pytest.raises(KeyError):
        with atomic.target(out) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyError("reader died")
    assert list(tmp_path.iterdir()) == []
    with atomic.target(out) as tmp:
        assert not tmp.exists()
        tmp.write_bytes(b"done")
    assert out.read_bytes() == b"done" and list(tmp_path.iterdir()) == [out]


def test_exception_inside_a_file_target_keeps_the_old_file(tmp_path):
    out = tmp_path / "labels.csv"
    atomic.write_text(out, "old")
    with pytest.raises(RuntimeError):
        with atomic.target(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["labels.csv"]


def test_a_directory_without_its_marker_is_not_published(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="arch.json was not written"):
        with atomic.target(out, directory=True, marker="arch.json") as tmp:
            (tmp / "params").write_text("p")
    assert list(tmp_path.iterdir()) == []


def test_publish_adds_files_with_the_marker_last_and_removes_stale_ones(tmp_path):
    out = tmp_path / "pairs"
    out.mkdir()
    for name, text in [("dataset_info.json", "old"), ("old-shard-00000-of-00002", "o"), ("slides.csv", "keep")]:
        (out / name).write_text(text)
    with pytest.raises(RuntimeError):
        with atomic.publish(out, marker="dataset_info.json", stale=["old-shard-00000-of-00002"]) as stage:
            (stage / "new-shard").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "old-shard-00000-of-00002", "slides.csv"]
    with atomic.publish(out, marker="dataset_info.json", stale=["old-shard-00000-of-00002"]) as stage:
        (stage / "new-shard").write_text("n")
        (stage / "dataset_info.json").write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "dataset_info.json": "new", "new-shard": "n", "slides.csv": "keep"}


def test_remove_leftovers(tmp_path):
    (tmp_path / "slide_003.array_record.tmp-4242-deadbeef").write_bytes(b"half")  # an older writer's name
    (tmp_path / ".publish.tmp-0123abcd").mkdir()
    (tmp_path / "slide_003.array_record").write_bytes(b"done")
    assert atomic.remove_leftovers(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["slide_003.array_record"]


def test_object_store_file_is_written_in_place_and_deleted_on_failure(tmp_path):
    log = []
    with epath_bucket.bucket(tmp_path, log):
        atomic.write_json("gs://bkt/run/summary.json", {"pairs": 3})
        assert log == ["gs://bkt/run/summary.json"]  # one upload, straight to the final name
        with pytest.raises(RuntimeError):
            with atomic.target("gs://bkt/run/summary.json") as tmp:
                assert os.fspath(tmp) == "gs://bkt/run/summary.json"
                with tmp.open("w") as f:
                    f.write("{half")
                raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and list((tmp_path / "run").iterdir()) == []


def test_object_store_directory_is_uploaded_with_its_marker_last(tmp_path):
    log = []
    with epath_bucket.bucket(tmp_path, log):
        with atomic.target("gs://bkt/ckpt", directory=True, marker="arch.json") as tmp:
            assert not os.fspath(tmp).startswith("gs://")  # staged locally
            (tmp / "arch.json").write_text("v1")
            (tmp / "params").mkdir()
            (tmp / "params" / "a").write_text("a1")
        assert log == ["gs://bkt/ckpt/params/a", "gs://bkt/ckpt/arch.json"]
        with pytest.raises(ValueError, match="marker"):
            with atomic.target("gs://bkt/ckpt", directory=True):
                pass
        with pytest.raises(RuntimeError):
            with atomic.target("gs://bkt/ckpt", directory=True, marker="arch.json") as tmp:
                (tmp / "arch.json").write_text("v2")
                raise RuntimeError("killed")
        assert (tmp_path / "ckpt" / "arch.json").read_text() == "v1"
        log.clear()
        with atomic.target("gs://bkt/ckpt", directory=True, marker="arch.json") as tmp:
            (tmp / "b").write_text("b2")
            (tmp / "arch.json").write_text("v2")
        assert log == ["gs://bkt/ckpt/b", "gs://bkt/ckpt/arch.json"]
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"arch.json", "b"}  # the old params/ went
    assert not list(Path(tempfile.gettempdir()).glob(f"ckpt{atomic.TEMP_MARK}*"))
