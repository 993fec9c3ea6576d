"""kill -9 in the middle of `python -m xmag_jax.train`, restart with the same workdir: the final parameters
and the sequence of records seen equal those of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6


def _env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO))
    return env


def _command(workdir: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "xmag_jax.train", "--config", str(REPO / "configs" / "debug.py"),
            "--workdir", str(workdir), f"--config.data.dir={data_dir}", f"--config.total_steps={TOTAL_STEPS}",
            "--config.batch_size=2", "--config.optim.warmup_steps=1", "--config.checkpoint.every=2",
            "--config.checkpoint.keep=5"]


def _final_params(workdir: Path) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(TOTAL_STEPS) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _records_by_step(workdir: Path) -> list[tuple[int, list[int]]]:
    return [(m["step"], m["record_index"]) for m in read_metrics(workdir)]


def test_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
    data_dir = tmp_path / "pairs"
    write_pair_shards(data_dir, 10, num_shards=2)  # 12 pairs consumed: the run crosses an epoch boundary
    env = _env(tmp_path / "jax_cache")

    reference = tmp_path / "reference"
    subprocess.run(_command(reference, data_dir), env=env, check=True, capture_output=True, timeout=600)

    resumed = tmp_path / "resumed"
    run = subprocess.Popen(_command(resumed, data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = resumed / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
    deadline = time.monotonic() + 600
    while not first_checkpoint.exists():
        assert run.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    steps_before_restart = [s for s, _ in _records_by_step(resumed)]
    assert 2 <= max(steps_before_restart) < TOTAL_STEPS

    restart = subprocess.run(_command(resumed, data_dir), env=env, capture_output=True, text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "resumed from checkpoint step" in restart.stderr

    assert _records_by_step(resumed) == _records_by_step(reference)
    assert [s for s, _ in _records_by_step(resumed)] == list(range(1, TOTAL_STEPS + 1))
    for got, want in zip(_final_params(resumed), _final_params(reference), strict=True):
        np.testing.assert_array_equal(got, want)
