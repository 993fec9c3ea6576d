"""A stand-in bucket for tests: `gs://bkt/...` served by a local folder through etils' own epath mock."""

import contextlib
import os
from pathlib import Path

from etils.epath import testing as epath_testing


@contextlib.contextmanager
def bucket(root: Path, log: list):
    """gs://bkt/... served by the local folder `root` through etils' own epath mock; every object write is
    logged, and a rename or replace on the bucket fails (object stores have none)."""
    def local(p):
        s = os.fspath(p)
        return str(root / s[len("gs://bkt/"):]) if s.startswith("gs://") else s

    def one(fn, path, *args, **kwargs):
        if os.fspath(path).startswith("gs://") and args[:1] and "w" in str(args[0]):
            log.append(os.fspath(path))
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # a bucket has no folders to create
        return fn(local(path), *args, **kwargs)

    def copy(fn, path, dst, **kwargs):
        log.append(os.fspath(dst))
        os.makedirs(os.path.dirname(local(dst)), exist_ok=True)
        return fn(local(path), local(dst), **kwargs)

    def no_rename(fn, path, dst):
        assert not (os.fspath(path) + os.fspath(dst)).count("gs://"), f"rename on an object store: {path} -> {dst}"
        return fn(path, dst)

    with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                                  remove=one, rmtree=one, stat=one, copy=copy, rename=no_rename,
                                  replace=no_rename):
        yield
