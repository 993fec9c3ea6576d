"""The train loop on synthetic shards with the real step (8 fake CPU devices): loss decreases, the
checkpoint restores onto 1 device, a NaN stops the run keeping the last good checkpoint, bad configs fail
before compile naming the key."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import debug
from xmag_jax import train
from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill.checkpointing import Checkpointer
from xmag_jax.distill.config_validation import ConfigError
from xmag_jax.distill.metrics import NonFiniteLossError, read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _config(data_dir: Path, **overrides):
    config = debug.get_config()
    config.data.dir = str(data_dir)
    config.total_steps = STEPS
    config.batch_size = 8
    config.mesh.fsdp = 4  # parameters and optimizer state sharded 4 ways, so restoring onto 1 device regathers them
    config.optim.warmup_steps = 2
    config.checkpoint.every = 4
    config.log_every = 4
    for key, value in overrides.items():
        group, _, leaf = key.rpartition(".")
        (config[group] if group else config)[leaf] = value
    return config


def _leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 8-step run on 8 devices (mesh data 2 x fsdp 4, batch 8, checkpoints at 4 and 8): (data dir, workdir,
    final params)."""
    root = tmp_path_factory.mktemp("train")
    write_pair_shards(root / "pairs", 24, num_shards=2)
    (root / "work").mkdir()  # lines of an earlier run killed before its first checkpoint: not this run's
    (root / "work" / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss/total": 99.0}}\n' for s in (1, 2, 3)))
    state = train.train(_config(root / "pairs"), str(root / "work"))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    return root / "pairs", root / "work", _leaves(state)


def test_loss_decreases_and_everything_is_logged(run):
    _, workdir, _ = run
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    first, last = lines[0]["loss/total"], lines[-1]["loss/total"]
    assert last < 0.7 * first, (first, last)
    for key in ("loss/global", "loss/tile", "loss/token", "grad_norm", "param_norm", "lr"):
        assert all(np.isfinite(m[key]) for m in lines), key
    timed = [m for m in lines if "step_time_s" in m]
    assert timed and all(m["pairs_per_s"] > 0 and m["model_tflops_per_s"] > 0 for m in timed)
    assert not any("mfu" in m for m in lines)  # a CPU has no known peak: no MFU rather than a made-up one
    assert all(len(m["record_index"]) == 8 for m in lines)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert Checkpointer(workdir, every=4, keep=3).all_steps() == [4, 8]


def test_restore_onto_one_device(run, tmp_path):
    data_dir, workdir, final_params = run
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from configs import debug
        from xmag_jax import data, sharding
        from xmag_jax.distill import step
        from xmag_jax.distill.checkpointing import Checkpointer
        config = debug.get_config()
        config.data.dir = {str(data_dir)!r}
        config.total_steps = {STEPS}
        config.batch_size = 8
        config.optim.warmup_steps = 2
        assert jax.device_count() == 1
        trainer = step.make_trainer(config, sharding.make_mesh(config.mesh))
        iterator = data.make_iterator(config.data, seed=config.seed, batch_size=config.batch_size)
        restored = Checkpointer({str(workdir)!r}, every=4, keep=3).restore_latest(trainer.abstract_state(), iterator)
        assert restored.step == {STEPS}
        leaves = jax.tree.leaves(restored.state.params)
        assert all(len(x.sharding.device_set) == 1 for x in leaves)
        np.savez({str(tmp_path / "restored.npz")!r}, *[np.asarray(x) for x in leaves])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = np.load(tmp_path / "restored.npz")
    assert len(restored.files) == len(final_params)
    for i, want in enumerate(final_params):
        np.testing.assert_array_equal(restored[f"arr_{i}"], want)


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(run, tmp_path):
    data_dir, workdir, final_params = run
    workdir = Path(shutil.copytree(workdir, tmp_path / "work"))
    # An absurd learning rate: the first update after the resume overflows the parameters. The NaN step is the
    # first after the restore, so the message blames that checkpoint or the config, never calls it good.
    config = _config(data_dir, total_steps=STEPS + 4, **{"optim.lr": 1e30})
    with pytest.raises(NonFiniteLossError, match=rf"at step {STEPS + 1}: .*first step after restoring checkpoint "
                                                 rf"step {STEPS}, so that checkpoint \(or a config change") as info:
        train.train(config, str(workdir))
    assert "good" not in str(info.value)
    checkpointer = Checkpointer(workdir, every=4, keep=3)
    assert checkpointer.all_steps() == [4, STEPS]
    assert max(m["step"] for m in read_metrics(workdir)) == STEPS  # the NaN step is not logged as a good one
    trainer_state = train.train(_config(data_dir), str(workdir))  # resumes at STEPS: nothing left to do
    for got, want in zip(_leaves(trainer_state), final_params, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_resumed_run_does_not_reapply_student_init(run, tmp_path):
    from flax import nnx

    from xmag_jax.models import checkpoint as model_checkpoint
    from xmag_jax.models import registry

    data_dir, workdir, final_params = run
    workdir = Path(shutil.copytree(workdir, tmp_path / "work"))
    model_checkpoint.save_model(tmp_path / "init", registry.create_model("vit_test", rngs=nnx.Rngs(3)), "vit_test")
    config = _config(data_dir, **{"student.init": str(tmp_path / "init"), "student.layer_scale_init": None})
    state = train.train(config, str(workdir))  # resumes at STEPS: nothing left to do
    for got, want in zip(_leaves(state), final_params, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 12}, "batch_size: 12 pairs does not divide by data-parallel size 8"),
    ({"teacher.checkpoint": "/nonexistent/uni2_h"}, "teacher.checkpoint: '/nonexistent/uni2_h' does not exist"),
    ({"teacher.allow_random_teacher": False}, "teacher.checkpoint: is empty"),
    ({"student.name": "uni"}, "student.name: uni's 14x14 token grid does not split into 4x4 blocks"),
    ({"data.dir": "/nonexistent/pairs"}, "data.dir: '/nonexistent/pairs' is not a directory"),
    ({"student.init": "/nonexistent/dinov2_vitb14", "student.layer_scale_init": None},
     "student.init: model checkpoint /nonexistent/dinov2_vitb14 does not exist"),
    ({"data.views": 0}, "data.views: must be >= 1"),
])
def test_config_errors_before_compile(tmp_path, overrides, message):
    write_pair_shards(tmp_path / "pairs", 8, num_shards=1)
    with pytest.raises(ConfigError, match=message):
        train.train(_config(tmp_path / "pairs", **overrides), str(tmp_path / "work"))
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_cli_rejects_an_unknown_override(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "xmag_jax.train", "--config", str(REPO / "configs" / "debug.py"),
         "--workdir", str(tmp_path), "--config.optim.learning_rat=0.1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
