"""Write-then-rename for local files and directories: a result appears under its final name only complete.

    with atomic.target(out_dir, directory=True) as tmp:   # tmp: an empty sibling directory of out_dir
        write_everything_into(tmp)
    # out_dir now holds what was written; after an exception it is untouched and tmp is gone

The temporary sibling is hidden (`.NAME.tmp-XXXXXXXX`), so globs over the parent do not pick it up, and a
job killed half-way leaves no file under the final name that could be taken for complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


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
