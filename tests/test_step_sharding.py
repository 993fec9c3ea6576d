"""The sharded step on 8 fake devices (data=4, fsdp=2, FSDP teacher), and 1 device vs 8 devices agreeing,
with the plain projectors and one view, and with XMAG's BatchNorm projectors and two views on scanned layers
(student and teacher blocks under a scan with stacked parameters).

The 1-device run is a real 1-device process (`XLA_FLAGS=--xla_force_host_platform_device_count=1`) started
as a subprocess running this file, while the 8-device run goes on in the test process. Tiles are 56 px
instead of 224 px (the models take dynamic sizes): the same geometry at 1/16 of the compute.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import debug
from xmag_jax import sharding
from xmag_jax.distill import step

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, PX, LR = 3, 8, 56, 3e-3
# Behind BatchNorm heads the student's final LayerNorm bias shifts every feature the heads see by a constant that
# BatchNorm subtracts again: its gradient is zero up to rounding, which AdamW turns into steps of ~lr either way.
INERT_UNDER_BATCH_NORM = ("param/['student']['norm']['bias']", "ema/['norm']['bias']")


def run_steps(projector_norm: str = "none", views: int = 1, scan: bool = False):
    """3 steps of a small dual-loss, EMA config on all local devices.

    Returns (trainer, teacher, teacher arrays before, numpy states before/after each step, metrics).
    """
    c = debug.get_config()
    c.batch_size, c.total_steps = BATCH, 10
    c.optim.warmup_steps, c.optim.lr, c.optim.ema_decay = 1, LR, 0.5
    c.loss.projector_hidden = 32
    c.loss.projector_norm, c.data.views = projector_norm, views
    c.student.scan_layers = c.teacher.scan_layers = scan
    c.teacher.sharding = "fsdp"
    # bf16 teacher outputs round differently under different partitionings, and AdamW's first steps
    # amplify that noise in parameters with small gradients; float32 isolates what sharding changes.
    c.teacher.dtype = "float32"
    c.mesh.data, c.mesh.fsdp = (4, 2) if jax.device_count() == 8 else (1, 1)
    trainer = step.make_trainer(c, sharding.make_mesh(c.mesh))
    state = trainer.init_state(jax.random.key(0))
    teacher = trainer.teacher_state()
    teacher_before = jax.tree.map(np.asarray, teacher)
    rng = np.random.default_rng(0)
    states, metrics = [jax.tree.map(np.asarray, state)], []
    for _ in range(STEPS):
        batch = dict(image_5x=rng.integers(0, 256, (BATCH, views, PX, PX, 3), dtype=np.uint8),
                     tiles_20x=rng.integers(0, 256, (BATCH, views, 16, PX, PX, 3), dtype=np.uint8),
                     record_index=np.arange(BATCH, dtype=np.int64))
        state, m = trainer.step(state, teacher, batch)
        states.append(jax.tree.map(np.asarray, state))
        metrics.append({k: float(v) for k, v in m.items()})
    return trainer, teacher, teacher_before, states, metrics


def flatten_run(states, metrics) -> dict[str, np.ndarray]:
    """`metric/<step>/<name>`, `param/<path>`, `ema/<path>`, `stats/<path>` (final state) -> arrays."""
    arrays = {f"metric/{i}/{k}": np.asarray(v) for i, m in enumerate(metrics) for k, v in m.items()}
    for name, tree in (("param", states[-1].params), ("ema", states[-1].ema), ("stats", states[-1].batch_stats)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            arrays[f"{name}/{jax.tree_util.keystr(path)}"] = leaf
    return arrays


def save_run(out: str, projector_norm: str, views: int, scan: bool) -> None:
    _, _, _, states, metrics = run_steps(projector_norm, views, scan)
    np.savez(out, devices=np.asarray(jax.device_count()), **flatten_run(states, metrics))


@pytest.fixture(scope="module", params=[("none", 1, False), ("batch", 2, True)],
                ids=["plain-1view", "batchnorm-2views-scan"])
def runs(request, tmp_path_factory):
    """The 8-device run in process, the 1-device run's saved arrays from a concurrent subprocess."""
    assert jax.device_count() == 8
    projector_norm, views, scan = request.param
    one_out = tmp_path_factory.mktemp("one_device") / "run.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, __file__, str(one_out), projector_norm, str(views), str(int(scan))],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    eight = run_steps(projector_norm, views, scan)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return eight, np.load(one_out)


def test_step_metrics_and_shardings(runs):
    (trainer, _, _, states, metrics), _ = runs
    assert set(metrics[0]) == {"loss/global", "loss/tile", "loss/token", "loss/total", "grad_norm",
                               "param_norm", "lr"}
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    for m in metrics:
        np.testing.assert_allclose(m["loss/total"], m["loss/global"] + m["loss/tile"] + m["loss/token"], rtol=1e-5)
    assert metrics[0]["lr"] == 0.0 and metrics[1]["lr"] == pytest.approx(LR)
    assert [int(s.step) for s in states] == list(range(STEPS + 1))
    scan = trainer.config.student.scan_layers
    blocks = trainer.state_shardings.params["student"]["blocks"]
    qkv = (blocks if scan else blocks[0])["attn"]["qkv"]["kernel"].get_value()
    fc1 = (trainer.teacher_shardings["blocks"] if scan else trainer.teacher_shardings["blocks"][0])["mlp"]["fc1"]
    layers = (None,) if scan else ()  # the stacked block axis is never sharded
    assert qkv.spec == jax.sharding.PartitionSpec(*layers, "fsdp", None)
    assert fc1["kernel"].get_value().spec == jax.sharding.PartitionSpec(*layers, "fsdp", None)
    assert trainer.batch_shardings["tiles_20x"].spec[0] == ("data", "fsdp")
    if trainer.config.loss.projector_norm == "batch":  # running statistics kept in the state, moved by the steps
        means = [s.batch_stats["global_proj"]["norm"]["mean"].get_value() for s in states]
        assert not np.any(means[0]) and all(np.any(a != b) for a, b in zip(means, means[1:]))
    else:
        assert states[-1].batch_stats is None


def test_teacher_is_frozen_and_only_student_and_projectors_train(runs):
    (_, teacher, teacher_before, states, _), _ = runs
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, teacher), teacher_before)
    assert set(states[0].params.keys()) == {"student", "global_proj", "tile_proj", "token_proj"}
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), states[1].params, states[2].params)
    assert all(jax.tree.leaves(changed))  # every trainable leaf moved at the first non-zero learning rate


def test_ema_follows_the_student(runs):
    """The last of 3 updates (step 2) averages with decay min(0.5, 3 / 12) = 0.25 under the EMA warmup."""
    (_, _, _, states, _), _ = runs
    expected = jax.tree.map(lambda e, p: 0.25 * e + 0.75 * p, states[-2].ema, states[-1].params["student"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), states[-1].ema, expected)


def test_one_device_and_eight_devices_agree(runs):
    (trainer, _, _, states, metrics), one = runs
    eight = flatten_run(states, metrics)
    assert int(one["devices"]) == 1
    assert set(one.files) - {"devices"} == set(eight)
    for k in (k for k in eight if k.startswith("metric/")):
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert sum(k.startswith("param/") for k in eight) > 20
    inert = INERT_UNDER_BATCH_NORM if trainer.config.loss.projector_norm == "batch" else ()
    for k in (k for k in eight if not k.startswith(("metric/", *inert))):
        # AdamW moves each parameter by ~lr = 3e-3 per step; 2e-4 absolute is well inside one step.
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-3, atol=2e-4, err_msg=k)


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1}, jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2} and sharding.data_parallel_size(mesh) == 4
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="needs 3 devices, have 8"):
        sharding.mesh_shape({"data": 3, "fsdp": 1}, 8)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="config.teacher.sharding"):
        sharding.rules_for("zero3")


def test_logical_rules_map_annotations_and_skip_dims_that_do_not_divide():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            init = nnx.initializers.zeros_init()
            self.w = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"), eager_sharding=False)(
                jax.random.key(0), (8, 4)))
            self.odd = nnx.Param(nnx.with_partitioning(init, ("embed",), eager_sharding=False)(
                jax.random.key(0), (6,)))
            self.plain = nnx.Param(init(jax.random.key(0), (3,)))

    state = nnx.state(nnx.eval_shape(Tiny))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    fsdp = sharding.tree_shardings(state, mesh, sharding.FSDP_RULES)
    assert fsdp["w"].get_value().spec == jax.sharding.PartitionSpec("fsdp", None)
    assert fsdp["odd"].get_value().spec == jax.sharding.PartitionSpec(None)  # 6 does not split 4 ways
    assert set(fsdp["plain"].get_value().spec) <= {None}  # unannotated: replicated
    replicated = sharding.tree_shardings(state, mesh, sharding.rules_for("replicate"))
    assert all(set(s.spec) <= {None} for s in jax.tree.leaves(replicated))
    assert sharding.batch_sharding(mesh, 3).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)


if __name__ == "__main__":
    save_run(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))
