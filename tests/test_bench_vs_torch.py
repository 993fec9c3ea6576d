"""`bench train --vs_torch`: the PyTorch+timm reference step computes what the JAX step computes.

56 px tiles (as test_distill_step.py): a 4x4 student grid and 4x4 teacher grids, on one device.
"""

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import debug
from xmag_jax import sharding
from xmag_jax.bench import train as bench_train
from xmag_jax.bench import vs_torch
from xmag_jax.convert.mapping import to_timm
from xmag_jax.distill import step
from xmag_jax.errors import UserError

pytest.importorskip("timm")
PX = 56


def tiny_config(**overrides):
    c = debug.get_config()
    c.batch_size = 2
    c.total_steps = 10
    c.optim.warmup_steps = 1
    c.optim.lr = 3e-3
    c.optim.ema_decay = 0.9
    c.loss.projector_hidden = 32
    c.teacher.dtype = "float32"  # bfloat16 rounding would hide small differences
    c.mesh.data, c.mesh.fsdp = 1, 1
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def test_torch_step_matches_the_jax_step_from_the_same_weights():
    config = tiny_config()
    trainer = step.make_trainer(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state(jax.random.key(0))
    teacher = trainer.teacher_state()
    initial = to_timm(jax.tree.map(np.asarray, nnx.to_pure_dict(state.params["student"])))
    ref = vs_torch.TorchStep(trainer, state, teacher, steps=3, threads=1)
    rng = np.random.default_rng(0)
    for _ in range(3):  # step 0 has learning rate 0 and sets the centers; 1 and 2 update with AdamW
        batch = dict(image_5x=rng.integers(0, 256, (2, 1, PX, PX, 3), dtype=np.uint8),
                     tiles_20x=rng.integers(0, 256, (2, 1, 16, PX, PX, 3), dtype=np.uint8))
        state, metrics = trainer.step(state, teacher, batch)
        torch_metrics = ref.step(vs_torch.to_torch_batch(batch))
        assert set(torch_metrics) == {*(f"loss/{t}" for t in ("global", "tile", "token", "total")), "grad_norm",
                                      "lr"}
        for key, value in torch_metrics.items():
            np.testing.assert_allclose(value, float(metrics[key]), rtol=2e-4, err_msg=key)
    assert float(metrics["lr"]) > 0
    timm_dict = lambda params: to_timm(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))  # noqa: E731
    expected, ema = timm_dict(state.params["student"]), timm_dict(state.ema)
    assert max(float(np.abs(v - initial[k]).max()) for k, v in expected.items()) > 1e-3  # the updates matter
    for key, value in ref.student.state_dict().items():
        np.testing.assert_allclose(value.detach().numpy(), expected[key], atol=2e-5, err_msg=key)
    for key, value in ref.ema.items():
        np.testing.assert_allclose(value.numpy(), ema[key], atol=2e-5, err_msg=key)


def test_without_torch_it_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UserError, match="--vs_torch needs torch and timm"):
        bench_train.main(["--config", "configs/debug.py", "--vs_torch"])


def test_unsupported_options_are_named():
    with pytest.raises(vs_torch.UnsupportedConfig, match="loss.projector_norm"):
        vs_torch.check_supported(tiny_config(**{"loss.projector_norm": "batch"}))
    with pytest.raises(UserError, match="--vs_torch and --teacher_cache"):
        bench_train.main(["--config", "configs/debug.py", "--vs_torch", "--teacher_cache"])
