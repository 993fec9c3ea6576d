"""Multi-host for real: two local CPU processes (jax.distributed over localhost) train configs/debug.py with
process-sharded data and write one Orbax checkpoint; the result equals a one-process run on the same
number of devices, and the checkpoint resumes in a run with a different process count."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DEVICES = 4  # in every run: one process x 4 CPU devices, or two processes x 2
BATCH = 4
# Augmentation off: Grain draws it from an element's position in this process's slice of the stream, so the
# same record is augmented differently with 1 and 2 processes. The records of each global batch are the same.
NO_AUGMENT = ["--config.data.augment.d4=False", "--config.data.augment.color=False",
              "--config.data.augment.hed=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO))
    return env


def _train(workdir: Path, data_dir: Path, steps: int, processes: int, cache_dir: Path) -> None:
    command = [sys.executable, "-m", "xmag_jax.train", "--config", str(REPO / "configs" / "debug.py"),
               "--workdir", str(workdir), f"--config.data.dir={data_dir}", f"--config.total_steps={steps}",
               f"--config.batch_size={BATCH}", "--config.optim.warmup_steps=1", "--config.checkpoint.every=2",
               "--config.log_every=1", *NO_AUGMENT]
    env = _env(DEVICES // processes, cache_dir)
    if processes == 1:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    address = f"localhost:{_free_port()}"
    runs = [subprocess.Popen([*command, "--coordinator_address", address, "--num_processes", str(processes),
                              "--process_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(processes)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for i, (run, (_, err)) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, f"process {i}: {err[-3000:]}"


def _params(workdir: Path, step: int) -> list[np.ndarray]:
    """The checkpoint's parameters, restored onto one device of this process (written on 4 devices)."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          checkpointer.metadata(path).item_metadata.tree)
    return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target)["params"])]


def _losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss/total"] for m in read_metrics(workdir)}


def _assert_close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path):
    data_dir = tmp_path / "pairs"
    write_pair_shards(data_dir, 24, num_shards=2)
    cache = tmp_path / "jax_cache"

    one = tmp_path / "one_process"
    _train(one, data_dir, steps=4, processes=1, cache_dir=cache)
    two = tmp_path / "two_processes"
    _train(two, data_dir, steps=2, processes=2, cache_dir=cache)

    # One checkpoint directory written by both processes together (not one per process).
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert [m["step"] for m in read_metrics(two)] == [1, 2]
    np.testing.assert_allclose([_losses(two)[s] for s in (1, 2)], [_losses(one)[s] for s in (1, 2)], rtol=1e-5)
    _assert_close(_params(two, 2), _params(one, 2))

    # The 2-process checkpoint resumes in one process (4 devices) and continues like the 1-process run.
    _train(two, data_dir, steps=4, processes=1, cache_dir=cache)
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert not (two / "checkpoints_corrupt").exists()
    np.testing.assert_allclose([_losses(two)[s] for s in (3, 4)], [_losses(one)[s] for s in (3, 4)], rtol=1e-4)
    _assert_close(_params(two, 4), _params(one, 4))
