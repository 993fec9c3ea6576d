"""The distillation step: loss-mode switches, gradient accumulation, teacher checkpoint, config errors, FLOPs.

The sharded 8-device step (frozen teacher, EMA, 1 vs 8 devices) is in test_step_sharding.py.

Tiles are 56 px here instead of 224 px (the models take dynamic sizes): a 4x4 student grid and 4x4 teacher
grids, the same geometry at 1/16 of the compute.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import debug
from xmag_jax import sharding
from xmag_jax.distill import config_validation, flops, optim, step
from xmag_jax.distill.config_validation import ConfigError
from xmag_jax.models import registry

PX = 56


def small_config(**overrides):
    c = debug.get_config()
    c.batch_size = 8
    c.total_steps = 10
    c.optim.warmup_steps = 1
    c.optim.lr = 3e-3
    c.loss.projector_hidden = 32
    c.mesh.data, c.mesh.fsdp = -1, 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def make_batch(b: int, seed: int = 0, px: int = PX, views: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(image_5x=rng.integers(0, 256, (b, views, px, px, 3), dtype=np.uint8),
                tiles_20x=rng.integers(0, 256, (b, views, 16, px, px, 3), dtype=np.uint8),
                record_index=np.arange(b, dtype=np.int64))


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("mode, terms, projectors, student_dtype", [
    ("global_only", {"global"}, {"global_proj"}, "bfloat16"),
    ("local_only", {"tile", "token"}, {"tile_proj", "token_proj"}, "float32"),
])
def test_loss_modes_switch_terms_and_projectors(mode, terms, projectors, student_dtype):
    """Traced (not compiled) at the real 224 px; the bf16 case is the real configs' student compute dtype."""
    config = small_config(**{"loss.mode": mode, "student.dtype": student_dtype})
    trainer = step.make_trainer(config, sharding.make_mesh(config.mesh))
    assert set(trainer.abstract_state().params.keys()) == {"student"} | projectors
    batch = {k: v for k, v in trainer.abstract_batch().items()}
    _, metrics = jax.eval_shape(trainer._step, trainer.abstract_state(), trainer.abstract_teacher_state(), batch)
    assert {k.removeprefix("loss/") for k in metrics if k.startswith("loss/")} == terms | {"total"}
    assert all(m.dtype == np.float32 and m.shape == () for m in metrics.values())


def test_grad_accumulation_matches_the_full_batch():
    """2 micro-batches of 2 pairs ≈ one batch of 4 (and the student remat option changes no number), over two
    steps so that the second uses the target centers the first set from its whole batch.

    On a 1-device mesh to keep the two compiles small. Parameters are compared to 2e-4 absolute: an AdamW
    update moves each by ~lr = 3e-3.
    """
    batches = [make_batch(4, seed=3), make_batch(4, seed=4)]
    results = []
    for accum, remat in ((1, False), (2, True)):
        config = small_config(**{"batch_size": 4, "optim.grad_accum": accum, "student.remat": remat,
                                 "optim.warmup_steps": 0, "mesh.fsdp": 1})
        trainer = step.make_trainer(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
        state, teacher, metrics = trainer.init_state(jax.random.key(1)), trainer.teacher_state(), []
        for batch in batches:
            state, m = trainer.step(state, teacher, batch)
            metrics.append({k: float(v) for k, v in m.items()})
        results.append((to_numpy(state.params), to_numpy(state.target_center), metrics))
    (p1, c1, m1), (p2, c2, m2) = results
    for a, b in zip(m1, m2):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, err_msg=k)
    assert set(c1) == {"embedding", "token"} and all(np.abs(c).max() > 0 for c in c1.values())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), c1, c2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4), p1, p2)


def test_target_centers_start_at_the_first_batch_mean_then_follow_the_momentum():
    config = small_config(**{"batch_size": 4, "mesh.fsdp": 1, "loss.center_momentum": 0.75,
                             "teacher.dtype": "float32"})
    trainer = step.make_trainer(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    teacher_params = trainer.teacher_state()
    teacher = nnx.merge(trainer.teacher_graphdef, teacher_params)
    state = trainer.init_state(jax.random.key(0))
    assert all(not np.any(np.asarray(c)) for c in state.target_center.values())
    expected = None
    for seed in (0, 1):
        batch = make_batch(4, seed=seed)
        tiles = batch["tiles_20x"].reshape(-1, PX, PX, 3)
        out = teacher(registry.normalize(trainer.teacher_arch, tiles))
        means = {"embedding": np.asarray(registry.embed(trainer.teacher_arch, out)).mean(0),
                 "token": np.asarray(out.patches, np.float32).mean((0, 1, 2))}
        expected = means if expected is None else {k: 0.75 * expected[k] + 0.25 * means[k] for k in means}
        state, _ = trainer.step(state, teacher_params, batch)
        for k in means:
            np.testing.assert_allclose(state.target_center[k], expected[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_target_centering_can_be_switched_off():
    config = small_config(**{"loss.center_targets": False})
    trainer = step.make_trainer(config, sharding.make_mesh(config.mesh))
    assert trainer.abstract_state().target_center is None


def test_ema_decay_warms_up_then_holds():
    config = debug.get_config()
    config.optim.ema_decay = 0.999
    decay = optim.ema_decay_schedule(config.optim)
    np.testing.assert_allclose([float(decay(n)) for n in (0, 10, 90, 10_000)], [0.1, 0.55, 0.91, 0.999], rtol=1e-6)
    config.optim.ema_warmup = False
    assert float(optim.ema_decay_schedule(config.optim)(0)) == np.float32(0.999)
    del config.optim["ema_warmup"]  # a run saved before the key existed had no warmup
    assert float(optim.ema_decay_schedule(config.optim)(0)) == np.float32(0.999)


def test_layer_scale_init_needs_a_student_with_layer_scale(monkeypatch):
    import dataclasses

    plain = registry.get_arch("vit_test", init_values=None)
    monkeypatch.setitem(registry.ARCHS, "vit_plain", dataclasses.replace(plain, name="vit_plain"))
    with pytest.raises(ConfigError, match="student.layer_scale_init: is set but 'vit_plain' has no LayerScale"):
        step.validate(small_config(**{"student.name": "vit_plain"}))
    step.validate(small_config(**{"student.name": "vit_plain", "student.layer_scale_init": None}))


def test_grid_mismatch_is_a_config_error_before_compile():
    # UNI's 16 px patches give a 14x14 grid on 224 px tiles: not 4x4 blocks.
    with pytest.raises(ConfigError, match="student.name: uni's 14x14 token grid"):
        step.make_trainer(small_config(**{"student.name": "uni"}), sharding.make_mesh(small_config().mesh))
    # A UNI teacher's 56x56 field mosaic does not pool onto vit_test's 16x16 grid.
    with pytest.raises(ConfigError, match="teacher.name: uni's field mosaic of 56x56"):
        step.validate(small_config(**{"teacher.name": "uni"}))
    # ... but without the token-level term it is fine.
    step.validate(small_config(**{"teacher.name": "uni", "loss.mode": "global_only"}))
    with pytest.raises(ConfigError, match="batch_size: 6 pairs"):
        step.make_trainer(small_config(batch_size=6), sharding.make_mesh(small_config().mesh))


def test_flops_formula_counts_the_model_matmuls():
    """The per-layer matmul count equals the parameter count of the model's block kernels (UNI2-h)."""
    arch = registry.get_arch("uni2_h")
    cfg = arch.vit
    model = nnx.eval_shape(lambda: registry.create_model("uni2_h", rngs=nnx.Rngs(0)))
    block = model.blocks[0]
    kernels = sum(np.prod(m.kernel.shape) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    tokens = cfg.grid_size**2 + cfg.num_prefix_tokens
    patch = 2 * cfg.grid_size**2 * np.prod(model.patch_embed.proj.kernel.shape)
    expected = patch + 2 * tokens * cfg.depth * kernels + 4 * tokens**2 * cfg.embed_dim * cfg.depth
    assert flops.vit_forward_flops(cfg) == pytest.approx(expected)
    assert 0.36e12 < flops.vit_forward_flops(cfg) < 0.40e12  # ≈ 0.68 B params x 2 x 265 tokens + attention
    f = flops.step_flops(small_config(batch_size=4))
    assert f.teacher_forward == pytest.approx(
        4 * 16 * flops.vit_forward_flops(registry.get_arch("vit_test_teacher").vit))
    assert f.total > f.teacher_forward + f.student_forward_backward


def test_teacher_restored_from_checkpoint_onto_fsdp_shardings(tmp_path):
    from xmag_jax.models import checkpoint as model_checkpoint

    saved = registry.create_model("vit_test_teacher", rngs=nnx.Rngs(7))
    model_checkpoint.save_model(tmp_path / "teacher", saved, "vit_test_teacher")
    config = small_config(**{"teacher.checkpoint": str(tmp_path / "teacher"), "teacher.sharding": "fsdp"})
    trainer = step.make_trainer(config, sharding.make_mesh(config.mesh))
    teacher = trainer.teacher_state()
    expected = nnx.state(saved, nnx.Param)
    jax.tree.map(lambda t, e: np.testing.assert_array_equal(np.asarray(t), np.asarray(e.astype("bfloat16"))),
                 teacher, expected)
    jax.tree.map(lambda t, s: t.sharding.is_equivalent_to(s, t.ndim) or pytest.fail(f"{t.sharding} != {s}"),
                 teacher, trainer.teacher_shardings)
    fc1 = teacher["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)

    model_checkpoint.save_model(tmp_path / "student", registry.create_model("vit_test", rngs=nnx.Rngs(0)), "vit_test")
    config.teacher.checkpoint = str(tmp_path / "student")
    with pytest.raises(ConfigError, match="teacher.checkpoint: .* holds a vit_test whose architecture differs"):
        step.make_trainer(config, sharding.make_mesh(config.mesh)).teacher_state()


def test_student_init_starts_from_the_checkpoint_with_fresh_projectors_and_optimizer(tmp_path):
    from xmag_jax.models import checkpoint as model_checkpoint

    saved = registry.create_model("vit_test", rngs=nnx.Rngs(7))
    model_checkpoint.save_model(tmp_path / "dinov2", saved, "vit_test")
    overrides = {"student.layer_scale_init": None, "optim.ema_decay": 0.999, "mesh.fsdp": 1}
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    fresh = step.make_trainer(small_config(**overrides), mesh).init_state(jax.random.key(0))
    config = small_config(**overrides, **{"student.init": str(tmp_path / "dinov2")})
    state = step.make_trainer(config, mesh).init_state(jax.random.key(0))
    expected = nnx.state(saved, nnx.Param)
    for tree in (state.params["student"], state.ema):
        jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want)),
                     tree, expected)
    assert not np.array_equal(np.asarray(fresh.params["student"]["cls_token"].get_value()),
                              np.asarray(expected["cls_token"].get_value()))
    for name in ("global_proj", "tile_proj", "token_proj"):  # as the random init makes them
        jax.tree.map(np.testing.assert_array_equal, to_numpy(state.params[name]), to_numpy(fresh.params[name]))
    jax.tree.map(np.testing.assert_array_equal, to_numpy(state.opt_state), to_numpy(fresh.opt_state))


def test_student_init_of_another_architecture_or_missing_is_a_config_error(tmp_path):
    from xmag_jax.models import checkpoint as model_checkpoint

    model_checkpoint.save_model(tmp_path / "teacher", registry.create_model("vit_test_teacher", rngs=nnx.Rngs(0)),
                                "vit_test_teacher")
    model_checkpoint.save_model(tmp_path / "student", registry.create_model("vit_test", rngs=nnx.Rngs(0)), "vit_test")
    with pytest.raises(ConfigError, match=r"student.init: .*teacher holds a vit_test_teacher whose architecture "
                                          r"differs from student.name='vit_test': .*'embed_dim': \(96, 64\)"):
        config_validation.check_files(small_config(**{"student.init": str(tmp_path / "teacher"),
                                                      "student.layer_scale_init": None}))
    with pytest.raises(ConfigError, match=r"student.init: model checkpoint .*/nowhere does not exist"):
        config_validation.check_files(small_config(**{"student.init": str(tmp_path / "nowhere"),
                                                      "student.layer_scale_init": None}))
    with pytest.raises(ConfigError, match="student.layer_scale_init: is set together with student.init"):
        step.validate(small_config(**{"student.init": str(tmp_path / "student")}))


def test_batch_norm_projector_matches_torch_batch_norm_in_training():
    """XMAG's head is torch's BatchNorm1d (eps 1e-5, momentum 0.1): same output and running statistics."""
    import torch

    from xmag_jax.distill.projectors import ViewBatchNorm

    x = np.random.default_rng(0).normal(2.0, 3.0, (12, 5)).astype(np.float32)
    norm = ViewBatchNorm(5)
    got = norm(jax.numpy.asarray(x)[:, None])[:, 0]  # one view
    reference = torch.nn.BatchNorm1d(5).train()
    want = reference(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.mean.get_value(), reference.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(norm.var.get_value(), reference.running_var.numpy(), rtol=1e-6)


def test_two_views_loss_is_the_mean_of_each_view_against_its_own_teacher():
    """The step on 2 views equals the mean of the steps on each view alone (BatchNorm statistics per view);
    pairing a view's student with the other view's teacher, or pooling BatchNorm over views, would not."""
    overrides = {"batch_size": 4, "mesh.fsdp": 1, "loss.projector_norm": "batch", "loss.center_targets": False,
                 "teacher.dtype": "float32"}
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    batch = make_batch(4, seed=5, views=2)
    for key in ("image_5x", "tiles_20x"):  # a dark and a bright view, so that a mix-up shows in the loss
        batch[key][:, 0] //= 2
        batch[key][:, 1] = 128 + batch[key][:, 1] // 2
    trainers = {views: step.make_trainer(small_config(**overrides, **{"data.views": views}), mesh) for views in (1, 2)}
    teacher = trainers[1].teacher_state()

    def losses(views, images, tiles):
        state = trainers[views].init_state(jax.random.key(0))
        _, metrics = trainers[views].step(state, teacher, {"image_5x": images, "tiles_20x": tiles})
        return {k: float(m) for k, m in metrics.items() if k.startswith("loss/")}

    both = losses(2, batch["image_5x"], batch["tiles_20x"])
    first, second = (losses(1, batch["image_5x"][:, v:v + 1], batch["tiles_20x"][:, v:v + 1]) for v in (0, 1))
    assert abs(first["loss/total"] - second["loss/total"]) > 1e-3  # the views differ
    for k in both:
        np.testing.assert_allclose(both[k], (first[k] + second[k]) / 2, rtol=1e-5, err_msg=k)
    swapped = losses(2, batch["image_5x"][:, ::-1], batch["tiles_20x"])  # each student view on the other's teacher
    assert abs(swapped["loss/total"] - both["loss/total"]) > 1e-3, (swapped, both)
    f1, f2 = (flops.step_flops(trainers[v].config) for v in (1, 2))
    assert f2.total == pytest.approx(2 * f1.total)


@pytest.mark.parametrize("cached", [False, True])
def test_student_forward_waits_for_the_teacher_targets(cached):
    """An optimization barrier ties the student's uint8 images to the teacher's float32 tile targets, so XLA runs
    the student after the teacher: left free, it keeps the student's saved activations live through the teacher's
    forward (+0.8 GiB/chip for configs/uni2h_vits14.py on v5p-256, docs/aot.md). Lowered only, not compiled."""
    config = small_config(**{"data.teacher_cache": "CACHE" if cached else ""})
    text = step.make_trainer(config, sharding.make_mesh(config.mesh)).lower().as_text()
    barriers = [line for line in text.splitlines() if "stablehlo.optimization_barrier" in line]
    if cached:
        assert not barriers
    else:
        assert len(barriers) == 1 and "xui8>" in barriers[0] and "xf32>" in barriers[0], barriers
