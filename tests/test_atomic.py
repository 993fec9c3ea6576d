"""Write-then-rename: results appear complete or not at all, and no temporary is left behind."""

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
