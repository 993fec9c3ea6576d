"""The Flax ViT family: shapes, registry, checkpoints, bad input, dtypes, position-embedding resampling."""

import os

import epath_bucket
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from xmag_jax.models import ARCHS, VisionTransformer, ViTConfig, create_model, embed, get_arch, normalize, vit
from xmag_jax.models.checkpoint import load_model, load_params, save_model
from xmag_jax.models.pos_embed import resample_pos_embed


@pytest.fixture(scope="module")
def teacher():
    return create_model("vit_test_teacher", rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, x: model(x))


def _images(b=2, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def test_output_shapes_and_token_layout(teacher):
    arch = get_arch("vit_test_teacher")
    out = forward(teacher, normalize(arch, _images()))
    assert out.pooled.shape == (2, 96) and out.cls.shape == (2, 96)
    assert out.registers.shape == (2, 4, 96)
    assert out.patches.shape == (2, 16, 16, 96)
    assert embed(arch, out).shape == (2, arch.embed_dim)
    np.testing.assert_array_equal(out.pooled, out.cls)


def test_registry_entries_match_reference_shapes():
    uni2 = get_arch("uni2_h").vit
    assert (uni2.pos_embed_len, uni2.mlp_hidden, uni2.mlp_hidden // 2) == (256, 8192, 4096)
    v2 = get_arch("virchow2")
    assert (v2.vit.pos_embed_len, v2.embed_dim) == (261, 2560)
    for name in ("vit_s14", "vit_b14", "vit_test", "vit_test_teacher"):
        assert ARCHS[name].vit.grid_size == 16


def test_virchow2_embedding_is_cls_and_mean_of_patches_without_registers():
    arch = get_arch("virchow2", embed_dim=48, depth=1, num_heads=2)
    model = VisionTransformer(arch.vit, rngs=nnx.Rngs(1))
    out = forward(model, normalize(arch, _images(1)))
    e = embed(arch, out)
    assert e.shape == (1, 96)
    np.testing.assert_allclose(e[:, :48], out.cls)
    np.testing.assert_allclose(e[:, 48:], out.patches.reshape(1, -1, 48).mean(1), rtol=1e-6, atol=1e-6)


def test_logical_axis_names(teacher):
    specs = nnx.get_partition_spec(nnx.state(teacher, nnx.Param))
    blk = specs["blocks"][0]
    assert tuple(blk["attn"]["qkv"]["kernel"].get_value()) == ("embed", "heads")
    assert tuple(blk["attn"]["proj"]["kernel"].get_value()) == ("heads", "embed")
    assert tuple(blk["mlp"]["fc1"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(blk["mlp"]["fc2"]["kernel"].get_value()) == ("mlp", "embed")
    assert tuple(blk["ls1"]["gamma"].get_value()) == ("embed",)
    assert tuple(specs["pos_embed"].get_value()) == (None, None, "embed")
    assert tuple(specs["patch_embed"]["proj"]["kernel"].get_value()) == (None, None, None, "embed")


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="known models: .*uni2_h.*vit_s14"):
        get_arch("uni3")


def test_bad_image_sizes(teacher):
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        teacher(jnp.zeros((1, 230, 230, 3)))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(img_size=225, patch_size=14)
    fixed = create_model("vit_test", rngs=nnx.Rngs(0), dynamic_img_size=False)
    with pytest.raises(ValueError, match="dynamic_img_size=False"):
        fixed(jnp.zeros((1, 448, 448, 3)))


def test_dynamic_size_changes_grid(teacher):
    out = forward(teacher, jnp.zeros((1, 168, 280, 3)))
    assert out.patches.shape == (1, 12, 20, 96)


@pytest.mark.parametrize("old,new", [(16, 32), (16, 12), (37, 16), (14, 33)])
def test_pos_embed_resampling_matches_torch_bicubic_antialias(old, new):
    x = torch.randn(1, 7, old, old, generator=torch.Generator().manual_seed(old * new))
    ref = F.interpolate(x, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    pos = x.permute(0, 2, 3, 1).reshape(1, old * old, 7).numpy()
    out = np.asarray(resample_pos_embed(jnp.asarray(pos), (old, old), (new, new)))
    np.testing.assert_allclose(out.reshape(1, new, new, 7), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_bf16_compute_is_close_to_fp32(teacher):
    arch = get_arch("vit_test_teacher")
    x = normalize(arch, _images())
    ref = forward(teacher, x).patches
    bf16 = create_model("vit_test_teacher", rngs=nnx.Rngs(0), dtype="bfloat16")
    out = forward(bf16, x.astype(jnp.bfloat16))
    assert out.patches.dtype == jnp.bfloat16 and normalize(get_arch("vit_test_teacher", dtype="bfloat16"),
                                                            _images(1)).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.patches, np.float32), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_patch_embed_matmul_and_attention_compute_the_library_ops(dtype):
    """PatchEmbed's matmul is the stride-p convolution of its kernel, Attention what jax.nn.dot_product_attention
    gives, each within float32 rounding (float32) or one bfloat16 rounding of the output (bfloat16)."""
    cfg = ViTConfig(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, dtype=dtype, param_dtype=dtype)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 28, 28, 3)), dtype)
    pe = model.patch_embed.proj
    conv = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), pe.kernel[...].astype(jnp.float32), (14, 14), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + pe.bias[...].astype(jnp.float32)
    out = nnx.jit(lambda m, x: m(x))(model.patch_embed, x)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (2, 2, 2, 32)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -7, atol=2e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(conv), **tol)

    attn = model.blocks[0].attn
    tokens = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 32)), dtype)
    qkv = attn.qkv(tokens).reshape(2, 9, 3, 2, 16)
    ref = attn.proj(jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(2, 9, 32))
    np.testing.assert_allclose(np.asarray(attn(tokens), np.float32), np.asarray(ref, np.float32), **tol)


def test_remat_gives_same_output(teacher):
    x = normalize(get_arch("vit_test_teacher"), _images(1))
    remat = create_model("vit_test_teacher", rngs=nnx.Rngs(0), remat=True)
    np.testing.assert_allclose(forward(remat, x).patches, forward(teacher, x).patches, atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_compute_the_unrolled_model(teacher, remat):
    x = normalize(get_arch("vit_test_teacher"), _images(2))
    scanned = create_model("vit_test_teacher", rngs=nnx.Rngs(5), scan_layers=True, remat=remat)
    qkv = nnx.state(scanned, nnx.Param)["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape[0] == teacher.cfg.depth and qkv.get_metadata()["out_sharding"][0] == "layers"
    params = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(params, vit.stack_blocks(nnx.to_pure_dict(nnx.state(teacher, nnx.Param))))
    nnx.update(scanned, params)
    ref, out = forward(teacher, x), forward(scanned, x)
    np.testing.assert_allclose(out.patches, ref.patches, atol=1e-5)
    np.testing.assert_allclose(out.pooled, ref.pooled, atol=1e-5)


def test_scanned_model_checkpoints_in_timm_per_block_layout(tmp_path):
    scanned = create_model("vit_test_teacher", rngs=nnx.Rngs(6), scan_layers=True)
    path = save_model(tmp_path / "ck", scanned, "vit_test_teacher")
    loaded, arch = load_model(path)  # per-block, as convert/export and embed see it
    assert not arch.vit.scan_layers and isinstance(loaded.blocks[1].attn.qkv.kernel[...], jax.Array)
    x = normalize(arch, _images(1))
    np.testing.assert_allclose(forward(loaded, x).patches, forward(scanned, x).patches, atol=1e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    abstract = nnx.eval_shape(lambda: create_model("vit_test_teacher", rngs=nnx.Rngs(0), scan_layers=True))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)

    def shard(v):
        names = v.get_metadata().get("out_sharding") or ()
        spec = jax.sharding.PartitionSpec(*["fsdp" if n == "embed" else None for n in names])
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    params = load_params(path, jax.tree.map(shard, params, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    qkv = params["blocks"]["attn"]["qkv"]["kernel"][...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    np.testing.assert_array_equal(qkv, nnx.state(scanned, nnx.Param)["blocks"]["attn"]["qkv"]["kernel"][...])


def test_checkpoint_round_trip_with_overrides(tmp_path):
    model = create_model("uni2_h", rngs=nnx.Rngs(2), embed_dim=48, depth=1, num_heads=2)
    path = save_model(tmp_path / "ck", model, "uni2_h")
    loaded, arch = load_model(path)
    assert arch.name == "uni2_h" and arch.vit.depth == 1 and arch.vit.embed_dim == 48
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
    np.testing.assert_array_equal(forward(loaded, x).patches, forward(model, x).patches)
    with pytest.raises(FileExistsError):
        save_model(path, model, "uni2_h")


def test_load_params_onto_sharded_abstract_state(tmp_path):
    model = create_model("vit_test", rngs=nnx.Rngs(3))
    path = save_model(tmp_path / "ck", model, "vit_test")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    abstract = nnx.eval_shape(lambda: create_model("vit_test", rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rules = {"embed": "fsdp"}

    def shard(v):
        names = v.get_metadata().get("out_sharding") or ()
        spec = jax.sharding.PartitionSpec(*[rules.get(n) for n in names])
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    params = jax.tree.map(shard, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    restored = load_params(path, params)
    qkv = restored["blocks"][0]["attn"]["qkv"]["kernel"]
    qkv = qkv.get_value() if isinstance(qkv, nnx.Variable) else qkv
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    np.testing.assert_array_equal(qkv, model.blocks[0].attn.qkv.kernel[...])


def test_missing_and_corrupt_checkpoints_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_model(tmp_path / "nothing_here")
    bad = tmp_path / "bad"
    (bad / "params").mkdir(parents=True)
    (bad / "arch.json").write_text("{not json")
    with pytest.raises(ValueError, match="arch.json"):
        load_model(bad)


def test_checkpoint_on_an_object_store_is_uploaded_with_arch_json_last(tmp_path):
    """gs:// has no rename: the checkpoint is staged locally and uploaded, arch.json (its completeness mark) last."""
    model = create_model("vit_test", rngs=nnx.Rngs(4))
    uploads = []
    with epath_bucket.bucket(tmp_path / "bucket", uploads):
        path = save_model("gs://bkt/students/ck", model, "vit_test")
    assert os.fspath(path) == "gs://bkt/students/ck"
    assert len(uploads) > 1 and uploads[-1] == "gs://bkt/students/ck/arch.json"
    loaded, _ = load_model(tmp_path / "bucket" / "students" / "ck")  # what the bucket holds is complete
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
    np.testing.assert_array_equal(forward(loaded, x).patches, forward(model, x).patches)
