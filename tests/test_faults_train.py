"""Faults around a training run (issue 13): checkpoints changed in place, two trainers on one workdir,
SIGTERM/SIGINT, out-of-range config values, one-line errors, libtpu noise off TPU hosts."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import debug
from xmag_jax import config as common
from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill import config_validation as cv
from xmag_jax.distill.checkpointing import CORRUPT_DIR, Checkpointer, state_digests
from xmag_jax.distill.metrics import read_metrics
from xmag_jax.errors import ConfigError
from xmag_jax.workdir_lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]


def _iterator():
    return iter(grain.MapDataset.range(1000).repeat().batch(4).to_iter_dataset())


def _state(step: int, sharding):
    """64 KiB of float32 with random bit patterns: incompressible, so Orbax's zstd stores them raw."""
    w = jax.lax.bitcast_convert_type(jax.random.bits(jax.random.key(step), (16384,), jnp.uint32), jnp.float32)
    return {"w": jax.device_put(w, sharding), "step": jnp.asarray(step, jnp.int32)}


def _abstract(sharding):
    return {"w": jax.ShapeDtypeStruct((16384,), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}


def _save_steps(workdir, steps, sharding):
    checkpointer = Checkpointer(workdir, every=1, keep=5)
    iterator = _iterator()
    for step in steps:
        next(iterator)
        checkpointer.save(step, _state(step, sharding), iterator, {}, force=True)
    checkpointer.wait()
    checkpointer.close()


def _overwrite_values(step_dir: Path, values: np.ndarray, size: int = 4096) -> Path:
    """Overwrite `size` bytes of `values` where they lie in the step's array files (random floats are stored
    raw: incompressible), keeping the file's length: the values change, the file still decodes."""
    needle = values.tobytes()[len(values.tobytes()) // 2:][:size]
    for f in (step_dir / "state").rglob("*"):
        data = f.read_bytes() if f.is_file() and f.parent.name == "d" else b""
        at = data.find(needle)
        if at >= 0:
            f.write_bytes(data[:at] + np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
                          + data[at + size:])
            return f
    raise AssertionError(f"{step_dir}: the array's bytes are not stored raw in any data file")


def test_digest_is_the_same_under_any_sharding_and_sees_one_changed_element():
    mesh = jax.make_mesh((8,), ("data",))
    w = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    tree = {"w": w, "b": w.astype(jnp.bfloat16), "k": jax.random.key(1), "s": jnp.asarray(3, jnp.int32)}
    sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.P()))
    sharded["w"] = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.P("data")))
    assert state_digests(tree) == state_digests(sharded)
    changed = dict(tree, w=w.at[37, 5].add(1e-6))
    diff = {k for k, v in state_digests(changed).items() if v != state_digests(tree)[k]}
    assert diff == {"['w']"}


def test_checkpoint_changed_in_place_is_quarantined_and_the_previous_step_used(tmp_path, caplog):
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh_sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), jax.P("data"))
    _save_steps(tmp_path, [2, 4], mesh_sharding)
    _overwrite_values(tmp_path / "checkpoints" / "4", np.asarray(_state(4, one_device)["w"]))
    checkpointer = Checkpointer(tmp_path, every=1, keep=5)
    iterator = _iterator()
    with caplog.at_level(logging.WARNING):
        restored = checkpointer.restore_latest(_abstract(one_device), iterator)
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["w"], _state(2, one_device)["w"])
    assert "checkpoint step 4" in caplog.text and "fails verification" in caplog.text
    assert "['w']" in caplog.text
    assert [p.name.split("-")[0] for p in (tmp_path / CORRUPT_DIR).iterdir()] == ["4"]
    assert checkpointer.all_steps() == [2]
    checkpointer.close()


# --- config: one validator, one kind of error ------------------------------------------------------------



def _debug(**overrides):
    config = debug.get_config()
    config.batch_size = 8
    for key, value in overrides.items():
        group, _, leaf = key.rpartition(".")
        (config[group] if group else config)[leaf] = value
    return config


def test_every_numeric_config_key_has_a_range():
    numeric = {k for k, v in cv.flatten(common.base_config()).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric.add("student.layer_scale_init")  # a float placeholder (None by default)
    assert numeric <= set(cv.RANGES), sorted(numeric - set(cv.RANGES))


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", -1e-3, "optim.lr: must be > 0, got -0.001"),
    ("optim.lr", float("nan"), "optim.lr: must be > 0, got nan"),
    ("optim.lr", float("inf"), "optim.lr: must be > 0, got inf"),
    ("optim.b1", 1.0, r"optim.b1: must be in \[0, 1\), got 1.0"),
    ("optim.b2", -0.5, r"optim.b2: must be in \[0, 1\)"),
    ("optim.weight_decay", -0.05, "optim.weight_decay: must be >= 0"),
    ("optim.clip_norm", 0.0, "optim.clip_norm: must be > 0"),
    ("optim.ema_decay", 1.5, r"optim.ema_decay: must be in \[0, 1\)"),
    ("loss.tile_weight", -1.0, "loss.tile_weight: must be >= 0"),
    ("mesh.fsdp", 0, "mesh.fsdp: must be >= 1 or -1"),
    ("mesh.fsdp", 3,
     r"config.mesh: .*'fsdp': 3.* needs|config.mesh: 8 devices do not divide by the fixed axes' size 3"),
    ("student.name", "uni", "student.name: uni's 14x14 token grid does not split into 4x4 blocks"),
    ("data.dir", "/nonexistent/pairs", "data.dir: '/nonexistent/pairs' is not a directory"),
    ("teacher.checkpoint", "/nonexistent/teacher", "teacher.checkpoint: '/nonexistent/teacher' does not exist"),
])
def test_one_validator_names_every_problem(key, value, message):
    with pytest.raises(ConfigError, match=message):
        cv.validate(_debug(**{key: value}), num_devices=8)


def test_unknown_key_gets_a_suggestion_from_the_one_validator():
    config = _debug()
    config.loss.tile_wieght = 0.5
    with pytest.raises(ConfigError, match=r"'loss.tile_wieght' is not a known key \(did you mean 'loss.tile_weight'"):
        cv.validate(config, num_devices=8, files=False)


# --- command lines: subprocesses, the way a person or a scheduler runs them -------------------------------


TOTAL = 6
NOISE = ("libtpu", "TPU_", "InitGoogle", "E0000", "Source Location Trace", "tfrc/runtime")


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    return env  # no JAX_PLATFORMS: the command picks the host's platforms itself


def _train_cmd(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xmag_jax.train", "--config", str(REPO / "configs" / "debug.py"),
            "--workdir", str(workdir), f"--config.data.dir={data_dir}", f"--config.total_steps={TOTAL}",
            "--config.batch_size=2", "--config.optim.warmup_steps=1", "--config.checkpoint.every=1000", *extra]


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Poll until `path` exists (the run reached that point); fails if the run ended first."""
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "error:" in ln]


def test_config_error_is_one_line_without_libtpu_noise(tmp_path):
    result = subprocess.run(_train_cmd(tmp_path / "work", tmp_path, "--config.optim.lr=-0.001"),
                            env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        "python -m xmag_jax.train: error: optim.lr: must be > 0, got -0.001"], result.stderr
    assert "Traceback" not in result.stderr
    assert not [ln for ln in result.stderr.splitlines() if any(n in ln for n in NOISE)], result.stderr
    assert not (tmp_path / "work" / "checkpoints").exists()




@pytest.mark.parametrize("args, message", [
    (["--config.loss.tile_wieght=0.5"], "--config.loss.tile_wieght: not a key of the config (did you mean "
                                        "'loss.tile_weight'?)"),
    (["--config.optim.lr=abc"], "flag --config.optim.lr=abc: could not convert string to float"),
    (["--config", "configs/no_such.py"], "--config: Configuration is not available"),
])
def test_flag_errors_are_one_line(tmp_path, args, message):
    command = [sys.executable, "-m", "xmag_jax.train", "--config", str(REPO / "configs" / "debug.py"),
               "--workdir", str(tmp_path / "work"), *args]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    [line] = _error_lines(result.stderr)
    assert line.startswith("python -m xmag_jax.train: error: ") and message in line, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_second_trainer_is_refused_and_sigterm_saves_a_step_that_resumes_exactly(tmp_path):
    data_dir = tmp_path / "pairs"
    write_pair_shards(data_dir, 10, num_shards=2)
    env = _env(tmp_path)
    work = tmp_path / "work"
    first = subprocess.Popen(_train_cmd(work, data_dir), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(work / LOCK_NAME, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, frozen wherever it is, so it cannot finish meanwhile
        second = subprocess.run(_train_cmd(work, data_dir), env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        [line] = _error_lines(second.stderr)
        assert "in use by train" in line and f"pid {first.pid}" in line, second.stderr
        assert "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGTERM)  # delivered on SIGCONT: the run saves the step it reaches, then exits
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
    stderr = first.stderr.read()
    assert "Traceback" not in stderr
    steps = [m["step"] for m in read_metrics(work)]
    saved = Checkpointer(work, every=1000, keep=3).all_steps()
    assert len(saved) == 1 and 1 <= saved[0] < TOTAL and steps == list(range(1, saved[0] + 1)), (saved, steps)
    assert f"stopped by SIGTERM after saving step {saved[0]}" in stderr
    assert not (work / LOCK_NAME).exists()

    resumed = subprocess.run(_train_cmd(work, data_dir), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint step {saved[0]}" in resumed.stderr
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, data_dir), env=env, check=True, capture_output=True, timeout=600)
    records = [(m["step"], m["record_index"]) for m in read_metrics(work)]
    assert records == [(m["step"], m["record_index"]) for m in read_metrics(reference)]
    assert [s for s, _ in records] == list(range(1, TOTAL + 1))
    final = [jax.tree.leaves(ocp.StandardCheckpointer().restore(w / "checkpoints" / str(TOTAL) / "state"))
             for w in (work, reference)]
    for a, b in zip(*final, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sigint_saves_and_exits_130_without_a_traceback(tmp_path):
    data_dir = tmp_path / "pairs"
    write_pair_shards(data_dir, 10, num_shards=2)
    work = tmp_path / "work"
    run = subprocess.Popen(_train_cmd(work, data_dir), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    _wait_for(work / LOCK_NAME, run)
    run.send_signal(signal.SIGINT)  # the handler is in place before the lock is taken
    assert run.wait(timeout=300) == 128 + signal.SIGINT
    stderr = run.stderr.read()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    saved = Checkpointer(work, every=1000, keep=3).all_steps()
    assert saved == [1] and "stopped by SIGINT after saving step 1" in stderr


def test_aot_runs_while_another_process_holds_the_libtpu_lock(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items()
           if k not in ("ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE",
                        "TPU_WORKER_HOSTNAMES")}
    holder_script = ("import sys; from xmag_jax import topologies; "
                     "topologies.compile_devices(topologies.parse('v5p-8')); print('holding', flush=True); "
                     "sys.stdin.readline()")  # libtpu's default start: it takes /tmp/libtpu_lockfile until exit
    holder = subprocess.Popen([sys.executable, "-c", holder_script], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = subprocess.run([sys.executable, "-m", "xmag_jax.aot", "--config", str(REPO / "configs" / "debug.py"),
                                 "--topology", "v5p-8"], env=env, capture_output=True, text=True, timeout=600)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v5p-8" in result.stdout
    assert not [ln for ln in result.stderr.splitlines() if any(n in ln for n in NOISE)], result.stderr


def test_host_platforms_leave_tpu_hosts_and_user_choices_alone(tmp_path, monkeypatch):
    from xmag_jax import platforms

    assert platforms.host_platforms(str(tmp_path)) == "cpu"
    pci = tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1ae0\n")  # a Google TPU chip: JAX's own choice stays
    assert platforms.host_platforms(str(tmp_path)) is None
    (pci / "vendor").write_text("0x8086\n")
    (tmp_path / "dev" / "vfio").mkdir(parents=True)
    (tmp_path / "dev" / "vfio" / "vfio").touch()  # the vfio control node alone is no TPU
    assert platforms.host_platforms(str(tmp_path)) == "cpu"
    (tmp_path / "dev" / "vfio" / "0").touch()
    assert platforms.host_platforms(str(tmp_path)) is None
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert platforms.configure() == ""


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    """JAX's preemption service spreads one process's SIGTERM to all: they save the same step and exit 143."""
    data_dir = tmp_path / "pairs"
    write_pair_shards(data_dir, 10, num_shards=2)
    work = tmp_path / "work"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    command = _train_cmd(work, data_dir, "--config.batch_size=4", "--config.total_steps=400",
                         "--coordinator_address", address, "--num_processes", "2")
    runs = [subprocess.Popen([*command, "--process_id", str(i)], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        _wait_for(work / LOCK_NAME, runs[0])  # process 0 is in train(): both joined the job, notifiers are up
        runs[1].send_signal(signal.SIGTERM)
        codes = [run.wait(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    errs = [run.stderr.read() for run in runs]
    assert codes == [143, 143], [e[-2000:] for e in errs]
    [step] = Checkpointer(work, every=1000, keep=3).all_steps()
    assert all(f"stopped by SIGTERM after saving step {step}" in e for e in errs)
    assert [m["step"] for m in read_metrics(work)] == list(range(1, step + 1))
