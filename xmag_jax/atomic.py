"""Atomic writes, local or on an object store: a result appears under its final name only complete.

    with atomic.target(out_dir, directory=True, marker="arch.json") as tmp:   # tmp: an empty directory
        write_everything_into(tmp)
    # out_dir now holds what was written; after an exception it is as it was

Local paths (and mounts such as gcsfuse) are written then renamed: `tmp` is a hidden sibling
(`.NAME.tmp-XXXXXXXX`, so globs over the parent do not pick it up) renamed over the final name on success and
deleted on failure, so a job killed half-way leaves no file under the final name that could be taken for complete.

Object stores (`gs://`, `s3://`, through etils.epath) have no rename, but an object appears only once its upload
completes: a killed upload leaves nothing. So a single file is written directly under its final name (an
exception deletes it, so an earlier version there is gone as well). A directory is many objects: it is staged in
a local temporary directory and uploaded file by file with its `marker` file last, after the old marker was
deleted first, so readers that take a directory as complete only when its marker is there (a model checkpoint's
`arch.json`, a TFDS dataset's `dataset_info.json`) never read a half-written one. `publish` does the same for a
set of files added to a directory that keeps its other contents (a TFDS dataset in a run folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath

TEMP_MARK = ".tmp-"  # in the name of every temporary this module creates locally


def is_object_store(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URL (`gs://bucket/...`, `s3://...`) rather than a local or mounted path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath: absolute when local, a URL such as `gs://bucket/dir` kept as it is."""
    return epath.Path(path) if is_object_store(path) else epath.Path(os.path.abspath(path))


def _temporary(path: epath.Path) -> epath.Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")


def _remove(path: epath.Path) -> None:
    if path.is_dir():
        path.rmtree()
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def target(path: str | os.PathLike, *, directory: bool = False, marker: str | None = None
           ) -> Iterator[epath.Path]:
    """Yields where to write `path`: a created, empty directory when `directory`, else a file path not yet
    created. On a clean exit the result replaces `path` (an existing directory there is removed), on an
    exception `path` is left as it was (object-store files: deleted) and nothing temporary remains.

    Locally the yielded path is a temporary sibling, renamed over `path`; its parent is created. On an object
    store a file is written directly at `path`, and a directory in a local staging directory published with
    `marker` (a file name inside it that readers check) uploaded last; `marker` is required there. When given,
    a clean exit without `marker` written is an error in both cases."""
    path = as_path(path)
    remote = is_object_store(path)
    if remote and not directory:
        try:
            yield path
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    if remote:
        if marker is None:
            raise ValueError(f"{path}: a directory on an object store is published with a marker file written "
                             "last, which readers check; none was given")
        with publish(path, marker=marker, stale=[p.name for p in path.iterdir()] if path.is_dir() else ()) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _check_marker(tmp, marker, path)
        if directory and path.is_dir():
            path.rmtree()
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _check_marker(written: epath.Path, marker: str | None, path: epath.Path) -> None:
    if marker is not None and not (written / marker).is_file():
        raise ValueError(f"{path}: nothing was published, its marker {marker} was not written")


@contextlib.contextmanager
def publish(directory: str | os.PathLike, *, marker: str, stale: Iterable[str] = ()) -> Iterator[epath.Path]:
    """Yields an empty staging directory whose files are moved into `directory` on a clean exit, in an order
    that keeps `directory/marker` a promise that the set is complete: the old marker is deleted first, then the
    `stale` entries of `directory` (names, files or folders), then every staged file is moved in (renamed when
    local, the staging folder being a hidden one inside `directory`; uploaded to an object store from a local
    temporary folder) and the marker last. Other contents of `directory` are kept. On an exception nothing in
    `directory` changes and the staging directory is deleted."""
    directory = as_path(directory)
    remote = is_object_store(directory)
    if remote:
        stage = epath.Path(tempfile.mkdtemp(prefix=f"{directory.name}{TEMP_MARK}"))
    else:
        directory.mkdir(parents=True, exist_ok=True)
        stage = directory / f".publish{TEMP_MARK}{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    try:
        yield stage
        _check_marker(stage, marker, directory)
        (directory / marker).unlink(missing_ok=True)
        for name in stale:
            if name != marker:
                _remove(directory / name)
        files = sorted((epath.Path(root) / f for root, _, names in os.walk(stage) for f in names),
                       key=lambda f: f == stage / marker)
        for f in files:
            dest = directory / f.relative_to(stage)
            if remote:
                f.copy(dest, overwrite=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        stage.rmtree()


def remove_leftovers(directory: str | os.PathLike) -> int:
    """Deletes the temporaries (names holding `TEMP_MARK`) that killed writers left directly in the local
    `directory`; returns how many. Call it only while holding the directory (`workdir_lock`): a live writer's
    temporary would go too."""
    directory = as_path(directory)
    if not directory.is_dir():
        return 0
    leftovers = [p for p in directory.iterdir() if TEMP_MARK in p.name]
    for p in leftovers:
        _remove(p)
    return len(leftovers)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` as `target` does (local: temp sibling renamed over it; gs://: one upload)."""
    with target(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written as `write_text` does."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


DIGEST_SPAN = 1 << 20  # bytes hashed at each end of a file


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's size and its first and last DIGEST_SPAN bytes: catches a truncated or overwritten
    shard without reading a multi-GB file on every rerun (done markers record it)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(DIGEST_SPAN))
        f.seek(max(size - DIGEST_SPAN, 0))
        digest.update(f.read(DIGEST_SPAN))
    return digest.hexdigest()[:32]
