"""Write-then-rename for local files and directories: a result appears under its final name only complete.

    with atomic.target(out_dir, directory=True) as tmp:   # tmp: an empty sibling directory of out_dir
        write_everything_into(tmp)
    # out_dir now holds what was written; after an exception it is untouched and tmp is gone

The temporary sibling is hidden (`.NAME.tmp-XXXXXXXX`), so globs over the parent do not pick it up, and a
job killed half-way leaves no file under the final name that could be taken for complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def target(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write (a created, empty directory when `directory`, else a
    file path not yet created). On a clean exit it replaces `path` (an existing directory there is removed
    first); on an exception it is deleted and `path` is left as it was. The parent of `path` is created."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def temp_name(path: str | os.PathLike) -> str:
    """A unique sibling name of `path` that no reader takes for the final file."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a temp sibling of `path` and renames it over `path`."""
    tmp = temp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
