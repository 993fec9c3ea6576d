"""Workdir locks: one live job per output directory; a dead job's lock is taken over."""

import json
import socket
import subprocess
import sys

import pytest

from xmag_jax import workdir_lock


def test_second_holder_is_refused_and_release_frees(tmp_path):
    with workdir_lock.hold(tmp_path, job="first"):
        with pytest.raises(workdir_lock.WorkdirLocked, match="already holds"):
            workdir_lock.acquire(tmp_path, job="second")
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
    with workdir_lock.hold(tmp_path, job="again"):
        pass


def test_live_process_on_this_host_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from xmag_jax import workdir_lock\n"
         f"workdir_lock.acquire({str(tmp_path)!r}, job='holder'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"holder.*pid {holder.pid}"):
            workdir_lock.acquire(tmp_path, job="second")
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over
    lock = workdir_lock.acquire(tmp_path, job="after kill")
    assert json.loads(lock.read_text())["job"] == "after kill"


def test_other_host_is_refused_and_process_index_nonzero_holds_nothing(tmp_path):
    (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname() + "-other", "pid": 1, "time": 0, "job": "train"}))
    with pytest.raises(workdir_lock.WorkdirLocked, match="-other"):
        workdir_lock.acquire(tmp_path, job="x")
    with workdir_lock.hold(tmp_path, job="worker", process_index=1):
        pass
