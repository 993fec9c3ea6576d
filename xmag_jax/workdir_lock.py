"""One job per output directory: an exclusive lock file held for the job's lifetime.

    with workdir_lock.hold(workdir, job="train"):     # raises WorkdirLocked naming the holder
        run_the_job()

The lock is `DIR/.xmag.lock`, a JSON record of its owner (`host`, `pid`, `start` — the process's start time,
so a reused pid is not mistaken for the owner — `time`, `job`, `argv`). Locally it is created with
`O_CREAT | O_EXCL`, so of two jobs started together exactly one gets it. A lock left by a process that is no
longer alive on this host (a kill -9, an OOM kill) is taken over with a warning. A lock held by a live process,
or by a process on another host (whose liveness cannot be seen from here), is refused with its owner named.

On `gs://` (through `etils.epath`) there is no exclusive create: the lock object is written when absent and
read back, and the job proceeds only if the record read back is its own. Two jobs racing within the same
second can still both see the object absent; the read-back makes the loser fail in all but that window.

In a multi-host job only process 0 takes the lock (`process_index` argument); the others hold nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator

from etils import epath

from xmag_jax import atomic
from xmag_jax.errors import UserError

LOCK_NAME = ".xmag.lock"


class WorkdirLocked(UserError):
    """Another live job holds the directory's lock; the message names it and the lock file."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process recorded in `owner` (on this host) is still the one running."""
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _process_start(pid)
    return start is None or owner.get("start") is None or start == owner["start"]


def _describe(owner: dict, lock: epath.Path) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
    return (f"{lock.parent}: in use by {owner.get('job', 'a job')} (host {owner.get('host')}, pid {owner.get('pid')}, "
            f"since {when}); wait for it, choose another directory, or, if that job is certainly gone, delete {lock}")


def _read(lock: epath.Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _create_local(lock: epath.Path, record: str) -> bool:
    try:
        fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(record)
    return True


def _create_remote(lock: epath.Path, record: str) -> bool:
    if lock.exists():
        return False
    lock.write_text(record)
    return lock.read_text() == record


def acquire(directory: str | os.PathLike, *, job: str) -> epath.Path:
    """Creates `directory` if needed and takes its lock; returns the lock path. Raises `WorkdirLocked`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    local = not atomic.is_object_store(lock)
    host = socket.gethostname()
    owner = {"host": host, "pid": os.getpid(), "start": _process_start(os.getpid()), "time": time.time(),
             "job": job, "argv": sys.argv, "token": uuid.uuid4().hex}
    record = json.dumps(owner)
    for _ in range(3):
        if (_create_local if local else _create_remote)(lock, record):
            return lock
        held = _read(lock)
        if held is None:
            continue  # released between our attempt and the read
        if held.get("host") == host and held.get("pid") == os.getpid() and held.get("start") == owner["start"]:
            raise WorkdirLocked(f"{directory}: this process already holds {lock}")
        if held and (held.get("host") != host or _alive(held)):
            raise WorkdirLocked(_describe(held, lock))
        what = "an unreadable lock" if not held else f"a stale lock of pid {held.get('pid')} (no longer running)"
        logging.warning("%s: taking over %s left by %s", directory, what, held.get("job", "a job") if held else "?")
        lock.unlink(missing_ok=True)
    raise WorkdirLocked(f"{directory}: could not take {lock} (another job keeps taking it)")


def release(lock: epath.Path) -> None:
    """Deletes the lock if it is still this process's."""
    held = _read(lock)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, job: str, process_index: int = 0) -> Iterator[None]:
    """The lock on `directory` for the duration of the block (taken by process 0 only)."""
    if process_index != 0:
        yield
        return
    lock = acquire(directory, job=job)
    try:
        yield
    finally:
        release(lock)
